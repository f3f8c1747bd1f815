"""norm1000 coordinates: bins 0..999 <-> floats in [0, 1] <-> pixels <-> "<|coord_k|>" strings.

This is the only module that knows the number of bins; everything else asks a CoordCodec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from coordexp.errors import UserError

NUM_BINS = 1000
TOKEN_RE = re.compile(r"<\|coord_(\d{1,4})\|>")


class CoordCodec:
    """Bin k <-> k / (K - 1); pixel x <-> round((K - 1) * x / (W - 1))."""

    def __init__(self, num_bins: int = NUM_BINS):
        assert num_bins >= 2
        self.num_bins = num_bins
        self.max_bin = num_bins - 1

    # -- strings ---------------------------------------------------------------------------
    def token(self, k: int) -> str:
        if not 0 <= k <= self.max_bin:
            raise ValueError(f"coord bin {k} outside 0..{self.max_bin}")
        return f"<|coord_{k}|>"

    def tokens(self) -> list[str]:
        return [f"<|coord_{k}|>" for k in range(self.num_bins)]

    def parse_token(self, text: str) -> int | None:
        """'<|coord_17|>' -> 17; None if it is not exactly one in-range coord token."""
        m = TOKEN_RE.fullmatch(text)
        if m is None:
            return None
        k = int(m.group(1))
        return k if k <= self.max_bin else None

    # -- floats ----------------------------------------------------------------------------
    def bin_to_norm(self, k: int) -> float:
        return k / self.max_bin

    def norm_to_bin(self, v: float) -> int:
        return min(max(round(self.max_bin * v), 0), self.max_bin)

    # -- pixels ----------------------------------------------------------------------------
    def px_to_bin(self, x: float, size: int) -> int:
        return min(max(round(self.max_bin * x / max(1, size - 1)), 0), self.max_bin)

    def bin_to_px(self, k: int | float, size: int) -> float:
        return k / self.max_bin * max(1, size - 1)

    def box_px_to_bins(self, box_xyxy: Sequence[float], width: int, height: int) -> list[int]:
        """Pixel box -> bins, rounded outward (floor x1,y1; ceil x2,y2), never degenerate."""
        x1, y1, x2, y2 = box_xyxy
        sx, sy = self.max_bin / max(1, width - 1), self.max_bin / max(1, height - 1)
        # the small epsilon keeps exact bin boundaries from rounding outward by float noise
        lo = [math.floor(x1 * sx + 1e-9), math.floor(y1 * sy + 1e-9)]
        hi = [math.ceil(x2 * sx - 1e-9), math.ceil(y2 * sy - 1e-9)]
        out = []
        for a, b in zip(lo, hi, strict=True):
            a, b = min(max(a, 0), self.max_bin), min(max(b, 0), self.max_bin)
            if b <= a:  # collapsed side: widen by one bin, inside the range
                a, b = (a, a + 1) if a < self.max_bin else (a - 1, a)
            out.append((a, b))
        return [out[0][0], out[1][0], out[0][1], out[1][1]]

    def box_bins_to_px(self, box_bins: Sequence[float], width: int, height: int) -> list[float]:
        x1, y1, x2, y2 = box_bins
        return [self.bin_to_px(x1, width), self.bin_to_px(y1, height),
                self.bin_to_px(x2, width), self.bin_to_px(y2, height)]

    # -- tokenizer ids ---------------------------------------------------------------------
    def token_ids(self, tokenizer) -> list[int]:
        """Token id of every coord token, in bin order; fails loudly if any is missing or shared."""
        ids = tokenizer.convert_tokens_to_ids(self.tokens())
        unk = tokenizer.unk_token_id
        missing = [self.token(k) for k, i in enumerate(ids) if i is None or i == unk]
        if missing:
            raise UserError(f"tokenizer lacks {len(missing)} coord tokens (first: {missing[0]});"
                            " run `coordexp model add-coord-tokens --src DIR --dst DIR` first")
        if len(set(ids)) != len(ids):
            raise UserError("tokenizer maps two coord tokens to one id; re-add the coord tokens")
        return ids
