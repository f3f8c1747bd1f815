"""Coord diagnostics (`coord_diag/*`) as sums and counts, plus rollout statistics for the report.

`coord_diag` returns, per key, a detached float64 tensor [2] = (sum, count). Micro-batches and
ranks aggregate by adding these tensors (e.g. one all_reduce of a stacked tensor);
`finalize_stats` forms sum / count at log time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from coordexp.boxes import box_iou
from coordexp.decode import coord_probs, expected_coord
from coordexp.losses import coord_log_mass

TOP_K = 5
P90 = 0.9
SLOT_KEYS = ("coord_diag/p_gt_mean", "coord_diag/acc_top5", "coord_diag/margin_mean",
             "coord_diag/expected_bin_mae", "coord_diag/expected_bin_abs_err_p90")
VOCAB_KEY = "coord_diag/coord_vocab_mass_mean"


def _stat(total: Tensor | float, count: Tensor | float, like: Tensor) -> Tensor:
    """(sum, count) as a detached float64 [2] tensor on like's device."""
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=like.device) for v in (total, count)]
    ).detach()


def _vocab_log_mass(coord_logits, vocab_lse, vocab_logits, coord_ids, temperature) -> Tensor:
    """log coord-vocab mass [N] from either the full-vocab lse or the full logits [N, V]."""
    if vocab_lse is None:
        assert coord_ids is not None, "vocab_logits needs coord_ids"
        vocab_lse = (vocab_logits.to(coord_logits.dtype) / temperature).logsumexp(-1)
        coord_logits = vocab_logits[:, coord_ids]
    return coord_log_mass(coord_logits, vocab_lse, temperature)


@torch.no_grad()
def coord_diag(coord_logits: Tensor, target_bins: Tensor, *, vocab_lse: Tensor | None = None,
               vocab_logits: Tensor | None = None, coord_ids: Tensor | None = None,
               temperature: float = 1.0) -> dict[str, Tensor]:
    """Coord-slot diagnostics at temperature tau: coord_logits [N, K], target_bins [N].

    Coord-vocab mass needs either vocab_lse [N] (logsumexp(z / tau) over the full vocabulary,
    see coordexp.lmhead) or vocab_logits [N, V] with coord_ids [K]; with neither, that key is
    absent. Every other key is always present; an empty call contributes (0, 0).
    `expected_bin_abs_err_p90` is this call's 0.9-quantile contributed as (p90, 1), so after
    aggregation it is the mean of per-micro-batch p90s, not a global quantile.
    `coord_tokens` is contributed as (N, 1): the finalised value is slots per call.
    """
    num_slots = coord_logits.shape[0]
    with_vocab = vocab_lse is not None or vocab_logits is not None
    keys = SLOT_KEYS + ((VOCAB_KEY,) if with_vocab else ())
    # every key is always present, as (0, 0) when empty, so ranks can all_reduce one stack
    stats = {key: _stat(0, 0, coord_logits) for key in keys}
    stats["coord_diag/coord_tokens"] = _stat(num_slots, 1, coord_logits)
    if num_slots == 0:
        return stats
    stats |= _slot_stats(coord_logits, target_bins.long(), temperature)
    if with_vocab:
        log_mass = _vocab_log_mass(
            coord_logits.float(), vocab_lse, vocab_logits, coord_ids, temperature
        )  # [N]
        stats[VOCAB_KEY] = _stat(log_mass.exp().sum(), num_slots, coord_logits)
    return stats


def _slot_stats(coord_logits: Tensor, target_bins: Tensor, temperature: float) -> dict:
    """(sum, count) of the per-slot diagnostics over N > 0 slots: [N, K], [N]."""
    num_slots, num_bins = coord_logits.shape
    s = coord_logits.float() / temperature  # [N, K]
    probs = coord_probs(coord_logits, temperature)  # [N, K]
    s_gt = s.gather(-1, target_bins[:, None])[:, 0]  # [N]
    top = s.topk(min(TOP_K, num_bins), dim=-1).indices  # [N, 5]
    abs_err = (expected_coord(coord_logits, temperature) * (num_bins - 1) - target_bins).abs()
    return {
        "coord_diag/p_gt_mean": _stat(probs.gather(-1, target_bins[:, None]).sum(), num_slots, s),
        "coord_diag/acc_top5": _stat((top == target_bins[:, None]).any(-1).sum(), num_slots, s),
        "coord_diag/margin_mean": _stat((s.max(-1).values - s_gt).sum(), num_slots, s),
        "coord_diag/expected_bin_mae": _stat(abs_err.sum(), num_slots, s),
        "coord_diag/expected_bin_abs_err_p90": _stat(torch.quantile(abs_err, P90), 1, s),
    }


def finalize_stats(stats: dict[str, Tensor]) -> dict[str, float]:
    """sum / count per key (after summing over micro-batches and ranks); count 0 -> omitted."""
    out = {}
    for key, pair in stats.items():
        total, count = pair.tolist()
        if count > 0:
            out[key] = total / count
    return out


def near_duplicate_pairs(boxes: list[list[float]], descs: list[str], iou_threshold: float) -> int:
    """Number of object pairs with the same desc and box IoU >= iou_threshold (one image)."""
    assert len(boxes) == len(descs)
    if len(boxes) < 2:
        return 0
    xyxy = torch.tensor(boxes, dtype=torch.float64)  # [P, 4]
    iou = box_iou(xyxy, xyxy)  # [P, P]
    codes = {d: i for i, d in enumerate(dict.fromkeys(descs))}
    desc_ids = torch.tensor([codes[d] for d in descs])  # [P]
    same = desc_ids[:, None] == desc_ids[None, :]  # [P, P]
    upper = torch.ones_like(same).triu(diagonal=1)  # each unordered pair once
    return int((same & upper & (iou >= iou_threshold)).sum())


def ordering_violations(boxes: list[list[float]]) -> int:
    """Adjacent objects whose (y1, x1) anchor decreases lexicographically (emission order)."""
    anchors = [(box[1], box[0]) for box in boxes]
    return sum(later < earlier for earlier, later in zip(anchors[:-1], anchors[1:], strict=True))
