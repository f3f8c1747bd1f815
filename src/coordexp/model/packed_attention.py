"""Attention for packed rows without a GPU: sdpa run sample by sample over a packed row, the
CPU counterpart of flash-attention's variable-length path.

The block-diagonal mask alone is exact but makes sdpa compute every (query, key) pair of the
row, most of them masked; here each sample's causal attention runs on its own columns, so a
packed row costs what its samples cost. Samples are found from the text position row (it
restarts at 0 per sample, data/packing.py). Any other call (padded batches, a cache, the vision
tower) goes to the stock sdpa with its mask unchanged. Registered with transformers under NAME.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def segment_bounds(text_positions: Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row of [R, L] text positions, the (start, end) of each sample: the runs 0, 1, 2, ...
    None unless every run starts at 0 (a packed layout): generation's left padding, for one,
    gives its pads position 1 and must keep the mask it comes with."""
    starts = torch.diff(text_positions, dim=-1) != 1  # [R, L - 1]: column t + 1 starts one
    starts = torch.cat([torch.ones_like(starts[:, :1]), starts], dim=-1)  # [R, L]
    if not bool((text_positions[starts] == 0).all()):
        return None
    L = text_positions.shape[1]
    bounds = []
    for row in starts.tolist():
        cuts = [t for t, s in enumerate(row) if s] + [L]
        bounds.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
    return bounds


def packed_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *,
                position_ids: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """query [R, H, L, d], key / value [R, Hkv, L, d] -> ([R, L, H, d], None)."""
    aligned = position_ids is not None and position_ids.ndim == 2 and \
        query.shape[2] == key.shape[2] == position_ids.shape[1]
    bounds = segment_bounds(position_ids) if aligned else None
    if bounds is None or all(len(b) == 1 for b in bounds):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for r, segments in enumerate(bounds):
        parts = [sdpa_attention_forward(module, query[r:r + 1, :, s:e], key[r:r + 1, :, s:e],
                                        value[r:r + 1, :, s:e], None, **kwargs)[0]
                 for s, e in segments]  # each [1, e - s, H, d], causal inside the sample
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows), None


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # padded calls keep sdpa's masks


def use_packed_attention(model) -> None:
    """Switch a model's language decoder from sdpa to sdpa run per packed sample; models on
    another attention (flash-attention: its own variable-length path) are left as they are."""
    text = model.model.language_model
    if text.config._attn_implementation == "sdpa":
        text.set_attn_implementation(NAME)
