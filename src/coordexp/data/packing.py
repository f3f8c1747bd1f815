"""Padding-free packing: the static pack plan (which samples share a row of `packing_length`
tokens) and the layout of a right-padded Batch as packed rows.

A packed row holds whole samples one after another. Each sample keeps its own M-RoPE positions
(computed per sample, as in the padded batch) and a text position row that restarts at 0, so
the model's mask builder sees where samples start and attention never crosses them (sdpa: a
block-diagonal causal mask; flash-attention: variable-length sequences). Row tails are a
padding segment of their own. Model-free: the caller passes the padded batch's M-RoPE positions.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, insort
from dataclasses import dataclass

import torch
from torch import Tensor

from coordexp.data.collate import IGNORE, Batch
from coordexp.errors import UserError


def plan_packs(lengths: list[int], packing_length: int, *, allow_single_long: bool = False,
               names: list[str] | None = None) -> list[list[int]]:
    """Best-fit-decreasing bin packing of samples (token lengths) into rows of packing_length.

    Deterministic: longest first (ties by index), each into the fullest row it fits (ties by
    the older row). Samples are never split; one longer than a row is an error naming it, or
    runs alone with allow_single_long. Packs come ordered by their smallest index, indices
    ascending inside a pack.
    """
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, pack id)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > packing_length:
            if not allow_single_long:
                name = names[i] if names else f"sample {i}"
                raise UserError(f"{name}: {n} tokens, longer than training.packing_length "
                                f"({packing_length}); raise packing_length or set "
                                "training.packing_allow_single_long=true")
            packs.append([i])
            continue
        k = bisect_left(free, (n, -1))
        if k == len(free):
            packs.append([i])
            insort(free, (packing_length - n, len(packs) - 1))
        else:
            room, p = free.pop(k)
            packs[p].append(i)
            insort(free, (room - n, p))
    return sorted(sorted(p) for p in packs)


def plan_digest(packs: list[list[int]]) -> str:
    """A short fingerprint of a plan: a resumed run checks it is packing the same way."""
    return hashlib.sha256(repr(packs).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """Where every real token of a padded [B, T] batch goes in the packed [R, L] rows."""

    src_b: Tensor  # [M] padded sample index of each real token, in packed order
    src_t: Tensor  # [M] its column in the padded batch (= its position inside its sample)
    dst_r: Tensor  # [M] packed row
    dst_t: Tensor  # [M] packed column
    order: Tensor  # [S] padded sample index of each packed sample, row by row
    segments: Tensor  # [S, 3] (row, start, length) of each packed sample
    shape: tuple[int, int]  # (R, L)

    def to(self, device) -> Layout:
        move = lambda t: t.to(device)
        return Layout(move(self.src_b), move(self.src_t), move(self.dst_r), move(self.dst_t),
                      move(self.order), move(self.segments), self.shape)

    def pack(self, x: Tensor, fill) -> Tensor:
        """x [B, T, ...] (padded) -> [R, L, ...] (packed), `fill` in the row tails."""
        out = x.new_full((*self.shape, *x.shape[2:]), fill)
        out[self.dst_r, self.dst_t] = x[self.src_b, self.src_t]
        return out


def plan_layout(lengths: Tensor, packs: list[list[int]]) -> Layout:
    """The layout of samples with these lengths [B] packed as `packs` (rows of sample ids)."""
    order = torch.tensor([b for pack in packs for b in pack])  # [S]
    rows = torch.tensor([r for r, pack in enumerate(packs) for _ in pack])  # [S]
    lens = lengths[order]  # [S]
    starts = torch.cat([lens[rows == r].cumsum(0) - lens[rows == r] for r in range(len(packs))])
    width = int(max(int(lens[rows == r].sum()) for r in range(len(packs))))
    first = torch.repeat_interleave(lens.cumsum(0) - lens, lens)  # [M]
    within = torch.arange(int(lens.sum())) - first  # [M] position inside the sample
    return Layout(torch.repeat_interleave(order, lens), within, torch.repeat_interleave(rows, lens),
                  torch.repeat_interleave(starts, lens) + within, order,
                  torch.stack([rows, starts, lens], 1), (len(packs), width))


def packed_positions(layout: Layout, rope_positions: Tensor) -> Tensor:
    """[4, R, L] position ids: a text row restarting at 0 for every sample (and for each row's
    padding tail), then the sample's own M-RoPE rows from rope_positions [3, B, T]."""
    R, L = layout.shape
    seg = layout.segments  # [S, 3]
    used = torch.zeros(R, dtype=torch.long, device=seg.device).index_add_(0, seg[:, 0],
                                                                          seg[:, 2])  # [R]
    tail = torch.arange(L, device=seg.device)[None, :] - used[:, None]  # [R, L], >= 0 in tails
    text = tail.clamp(min=0)
    text[layout.dst_r, layout.dst_t] = layout.src_t
    mrope = text[None].repeat(3, 1, 1)  # [3, R, L]
    mrope[:, layout.dst_r, layout.dst_t] = rope_positions[:, layout.src_b, layout.src_t]
    return torch.cat([text[None], mrope])


def pack_batch(batch: Batch, rope_positions: Tensor, packs: list[list[int]]
               ) -> tuple[Batch, Layout]:
    """A right-padded Batch as packed rows: tokens, labels, types and coord slots moved to
    their packed place, per-sample positions [4, R, L], images in packed sample order.
    No attention mask: the positions tell the model where each sample starts."""
    inputs = batch.inputs
    device = inputs["input_ids"].device
    layout = plan_layout(inputs["attention_mask"].sum(1).cpu(), packs).to(device)
    # row tails: token 0 (never an image token), attending only to themselves, never read
    packed = {"input_ids": layout.pack(inputs["input_ids"], 0),
              "mm_token_type_ids": layout.pack(inputs["mm_token_type_ids"], 0),
              "position_ids": packed_positions(layout, rope_positions)}
    if "pixel_values" in inputs:
        grid = inputs["image_grid_thw"]  # [B, 3]: one image per sample
        pixels = inputs["pixel_values"].split(grid.prod(-1).tolist())
        packed["pixel_values"] = torch.cat([pixels[b] for b in layout.order.tolist()])  # [P, C]
        packed["image_grid_thw"] = grid[layout.order]
    token_type = layout.pack(batch.token_type, 0)
    coord_key = _coord_places(layout, batch.coord_b, batch.coord_t)  # [N]
    keep = coord_key.argsort()
    width = layout.shape[1]
    sample_ids = [batch.sample_ids[b] for b in layout.order.tolist()] if batch.sample_ids else []
    out = Batch(packed, layout.pack(batch.labels, IGNORE), token_type, coord_key[keep] // width,
                coord_key[keep] % width, batch.coord_bins[keep], batch.prompt_lens[layout.order],
                sample_ids, layout.segments)
    return out, layout


def _coord_places(layout: Layout, coord_b: Tensor, coord_t: Tensor) -> Tensor:
    """Packed row * L + column of each padded coord slot (b, t)."""
    rank = torch.empty_like(layout.order)
    rank[layout.order] = torch.arange(len(layout.order), device=rank.device)
    seg = layout.segments[rank[coord_b]]  # [N, 3]
    return seg[:, 0] * layout.shape[1] + seg[:, 1] + coord_t
