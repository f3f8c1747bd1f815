"""Coordinate decode from coord-bin logits: expectation ("CoordExp"), argmax, straight-through.

Bin k of K decodes to k / (K - 1); K is read from the logits' last dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

DECODE_MODES = ("exp", "st")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (keeps gradcheck exact)."""
    return torch.promote_types(x.dtype, torch.float32)


def bin_values(coord_logits: Tensor) -> Tensor:
    """Normalised value of every bin, k / (K - 1): [K], in the logits' compute dtype."""
    num_bins = coord_logits.shape[-1]
    grid = torch.arange(num_bins, device=coord_logits.device, dtype=compute_dtype(coord_logits))
    return grid / (num_bins - 1)


def coord_probs(coord_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """softmax(s / tau) over the bins in float32 (or float64): [..., K] -> [..., K]."""
    return torch.softmax(coord_logits.to(compute_dtype(coord_logits)) / temperature, dim=-1)


def expected_coord(coord_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Expectation decode sum_k p_k * k / (K - 1): [..., K] -> [...] in [0, 1]."""
    return coord_probs(coord_logits, temperature) @ bin_values(coord_logits)


def argmax_coord(coord_logits: Tensor) -> Tensor:
    """Hard decode argmax_k s_k / (K - 1): [..., K] -> [...] in [0, 1], no gradient."""
    return bin_values(coord_logits)[coord_logits.argmax(dim=-1)]


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward the hard value, backpropagate the soft gradient."""
    return hard + (soft - soft.detach())  # forward = hard, gradient = soft


def decode_coords(coord_logits: Tensor, mode: str = "exp", temperature: float = 1.0) -> Tensor:
    """Decode per `coord_decode_mode`: "exp" (expectation) or "st" (argmax forward, expectation
    gradient). [..., K] -> [...] in [0, 1]."""
    soft = expected_coord(coord_logits, temperature)
    if mode == "exp":
        return soft
    if mode == "st":
        return straight_through(argmax_coord(coord_logits), soft)
    raise ValueError(f"coord_decode_mode must be one of {DECODE_MODES}, got {mode!r}")
