"""The CoordExp objective as unweighted terms: token CE, coord-distribution losses, box losses.

Shapes: N supervised coord slots, K coord bins, V vocabulary, M supervised text positions.
Maths runs in float32 (float64 inputs stay float64). Every term is a mean; an empty input
(no slots, no boxes, no weight) gives a zero that keeps the autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from coordexp.boxes import canonicalize_boxes, paired_complete_box_iou
from coordexp.codec import NUM_BINS
from coordexp.decode import compute_dtype

TEXT_GATE_EPS = 1e-6


def _zero(x: Tensor) -> Tensor:
    """A zero scalar that keeps `x` in the graph (for empty inputs)."""
    return x.to(compute_dtype(x)).sum() * 0


# -- weighting -------------------------------------------------------------------------------
def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum w * v / sum w over any shape; zero (with graph) when the weights sum to zero.

    Avoids a host sync: the denominator is replaced by 1 when it is 0 (the numerator is 0 then).
    """
    den = weights.sum()
    return (weights * values).sum() / torch.where(den > 0, den, torch.ones_like(den))


# -- coord-distribution losses ----------------------------------------------------------------
def gaussian_targets(target_bins: Tensor, *, sigma: float, truncate: float | None = None,
                     num_bins: int = NUM_BINS) -> Tensor:
    """Gaussian soft labels around each target bin (sigma in bins; bins farther than `truncate`
    get 0): [N] -> [N, K] float32, rows sum to 1."""
    grid = torch.arange(num_bins, device=target_bins.device, dtype=torch.float32)  # [K]
    dist = grid[None, :] - target_bins[:, None].to(torch.float32)  # [N, K]
    w = torch.exp(-0.5 * (dist / sigma) ** 2)
    if truncate is not None:
        w = w * (dist.abs() <= truncate)
    return w / w.sum(-1, keepdim=True)


def _targets_like(coord_logits: Tensor, target_bins: Tensor, sigma, truncate) -> Tensor:
    num_bins = coord_logits.shape[-1]
    q = gaussian_targets(target_bins, sigma=sigma, truncate=truncate, num_bins=num_bins)
    return q.to(compute_dtype(coord_logits))  # [N, K]


def coord_soft_ce(coord_logits: Tensor, target_bins: Tensor, *, sigma: float,
                  truncate: float | None = None, temperature: float = 1.0) -> Tensor:
    """Mean over slots of -sum_k q_k log softmax(s / tau)_k against Gaussian targets q."""
    if coord_logits.shape[0] == 0:
        return _zero(coord_logits)
    q = _targets_like(coord_logits, target_bins, sigma, truncate)  # [N, K]
    logp = torch.log_softmax(coord_logits.to(q.dtype) / temperature, dim=-1)  # [N, K]
    return -(q * logp).sum(-1).mean()


def coord_w1(coord_logits: Tensor, target_bins: Tensor, *, sigma: float,
             truncate: float | None = None, temperature: float = 1.0) -> Tensor:
    """Mean over slots of the 1-D Wasserstein distance sum_k |CDF_p(k) - CDF_q(k)| / (K - 1),
    p = softmax(s / tau), q Gaussian targets; a one-hot moved by d bins costs d / (K - 1)."""
    num_slots, num_bins = coord_logits.shape
    if num_slots == 0:
        return _zero(coord_logits)
    q = _targets_like(coord_logits, target_bins, sigma, truncate)  # [N, K]
    p = torch.softmax(coord_logits.to(q.dtype) / temperature, dim=-1)  # [N, K]
    # the last CDF entry is 1 for both, so it is left out (exactly equal, and no |0| kink)
    gap = (p.cumsum(-1) - q.cumsum(-1))[:, :-1]  # [N, K-1]
    return gap.abs().sum(-1).mean() / (num_bins - 1)


def coord_hard_ce(coord_logits: Tensor, target_bins: Tensor) -> Tensor:
    """Mean CE over the K coord bins against the target bin (no temperature)."""
    if coord_logits.shape[0] == 0:
        return _zero(coord_logits)
    return F.cross_entropy(coord_logits.to(compute_dtype(coord_logits)), target_bins)


def coord_log_mass(coord_logits: Tensor, vocab_lse: Tensor, temperature: float = 1.0) -> Tensor:
    """log of the probability mass on the coord sub-vocabulary, <= 0: [N, K], [N] -> [N].

    vocab_lse is logsumexp(z / tau) over the full vocabulary at the same temperature tau.
    """
    coord_lse = (coord_logits.to(compute_dtype(coord_logits)) / temperature).logsumexp(-1)
    return (coord_lse - vocab_lse.to(coord_lse.dtype)).clamp(max=0)


def coord_gate_from_lse(coord_logits: Tensor, vocab_lse: Tensor, *,
                        temperature: float = 1.0) -> Tensor:
    """Lean coord gate: mean of -log(coord-vocab mass) from the coord slice [N, K] and the
    full-vocabulary logsumexp(z / tau) [N] (see coordexp.lmhead.vocab_logsumexp)."""
    if coord_logits.shape[0] == 0:
        return _zero(coord_logits) + _zero(vocab_lse)
    return -coord_log_mass(coord_logits, vocab_lse, temperature).mean()


def coord_gate(vocab_logits: Tensor, coord_ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Mean over slots of -log(probability mass of softmax(z / tau) on the coord ids), >= 0.
    vocab_logits [N, V], coord_ids [K]."""
    z = vocab_logits.to(compute_dtype(vocab_logits))  # [N, V]
    vocab_lse = (z / temperature).logsumexp(-1)  # [N]
    return coord_gate_from_lse(z[:, coord_ids], vocab_lse, temperature=temperature)


def text_gate_from_lse(coord_logits: Tensor, vocab_lse: Tensor, *,
                       temperature: float = 1.0) -> Tensor:
    """Lean text gate at text positions: mean of -log(1 - coord mass + eps), from the coord
    slice [M, K] and the full-vocabulary logsumexp(z / tau) [M]."""
    if coord_logits.shape[0] == 0:
        return _zero(coord_logits) + _zero(vocab_lse)
    log_mass = coord_log_mass(coord_logits, vocab_lse, temperature)  # [M]
    non_coord_mass = -torch.expm1(log_mass)  # 1 - mass, accurate when mass is near 1
    return -torch.log(non_coord_mass + TEXT_GATE_EPS).mean()


def text_gate(vocab_logits: Tensor, coord_ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Mean over text positions of -log(1 - coord-vocab mass + eps): keeps coord tokens out of
    text. vocab_logits [M, V], coord_ids [K]."""
    z = vocab_logits.to(compute_dtype(vocab_logits))  # [M, V]
    vocab_lse = (z / temperature).logsumexp(-1)  # [M]
    return text_gate_from_lse(z[:, coord_ids], vocab_lse, temperature=temperature)


# -- box losses ------------------------------------------------------------------------------
def bbox_smoothl1(pred_norm: Tensor, gt_norm: Tensor) -> Tensor:
    """SmoothL1 (beta 1) averaged over all 4N corner values of the raw boxes: [N, 4], [N, 4]."""
    if pred_norm.shape[0] == 0:
        return _zero(pred_norm)
    dtype = compute_dtype(pred_norm)
    return F.smooth_l1_loss(pred_norm.to(dtype), gt_norm.to(dtype), beta=1.0)


def bbox_ciou(pred_norm: Tensor, gt_norm: Tensor) -> Tensor:
    """Mean of 1 - CIoU over matched boxes, both canonicalised (min/max per axis, clamped to
    [0, 1]) so degenerate or flipped predictions give a finite loss: [N, 4], [N, 4]."""
    if pred_norm.shape[0] == 0:
        return _zero(pred_norm)
    dtype = compute_dtype(pred_norm)
    pred = canonicalize_boxes(pred_norm.to(dtype))
    gt = canonicalize_boxes(gt_norm.to(dtype))
    return (1 - paired_complete_box_iou(pred, gt)).mean()
