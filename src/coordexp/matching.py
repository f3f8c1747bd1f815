"""Hungarian matching of predicted to ground-truth boxes with candidate pruning and an IoU gate.

Used identically by Channel B (which preds are supervised) and by evaluation (F1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Match:
    """pairs (pred_i, gt_j) sorted by pred index, with matched_ious in the same order."""

    pairs: list[tuple[int, int]]
    fp_indices: list[int]
    fn_indices: list[int]
    gating_rejections: int  # candidate pairs whose IoU fell below the gate
    matched_ious: list[float]


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact IoU of every pair: [P, 4], [G, 4] xyxy -> [P, G]; an inverted side counts as empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [P, G, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [P, G, 2]
    inter = np.clip(rb - lt, 0, None).prod(-1)  # [P, G]
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(-1)


def candidate_mask(iou: np.ndarray, pred: np.ndarray, gt: np.ndarray, top_k: int) -> np.ndarray:
    """[P, G] bool: each pred's top_k GT by IoU (ties by GT index), or by centre distance
    when all its IoUs are 0."""
    center_d2 = (((pred[:, None, :2] + pred[:, None, 2:]) - (gt[None, :, :2] + gt[None, :, 2:]))
                 ** 2).sum(-1)  # [P, G], (2 x centre offset)^2 keeps the same order
    key = np.where(iou.max(1, keepdims=True) > 0, -iou, center_d2)  # [P, G], smaller is better
    order = np.argsort(key, axis=1, kind="stable")[:, :top_k]  # [P, k]
    mask = np.zeros(iou.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def match_boxes(pred: np.ndarray, gt: np.ndarray, *, candidate_top_k: int = 10,
                iou_gate: float = 0.3, fp_cost: float = 1.0, fn_cost: float = 1.0) -> Match:
    """Minimum-cost 1:1 matching: a pair costs 1 - IoU, an unmatched pred fp_cost, an
    unmatched GT fn_cost; pairs outside the candidates or below the gate are infeasible.
    pred [P, 4], gt [G, 4] xyxy in any one coordinate space."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    iou = pairwise_iou(pred, gt)  # [P, G]
    cand = candidate_mask(iou, pred, gt, candidate_top_k) if iou.size else iou.astype(bool)
    return match_candidates(iou, cand, iou_gate=iou_gate, fp_cost=fp_cost, fn_cost=fn_cost)


def match_candidates(iou: np.ndarray, cand: np.ndarray, *, iou_gate: float, fp_cost: float,
                     fn_cost: float) -> Match:
    """The assignment step of match_boxes, given IoU [P, G] and candidate mask [P, G]; lets the
    evaluator reuse one IoU matrix for several gates."""
    num_pred, num_gt = iou.shape
    feasible = cand & (iou >= iou_gate)  # [P, G]
    rejections = int((cand & ~feasible).sum())
    if not feasible.any():
        return Match([], list(range(num_pred)), list(range(num_gt)), rejections, [])
    cost = np.zeros((num_pred + num_gt, num_gt + num_pred))  # [P + G, G + P]
    cost[:num_pred, :num_gt] = np.where(feasible, 1.0 - iou, np.inf)
    cost[:num_pred, num_gt:] = fp_cost  # pred left unmatched
    cost[num_pred:, :num_gt] = fn_cost  # GT left unmatched
    rows, cols = linear_sum_assignment(cost)
    real = (rows < num_pred) & (cols < num_gt)
    pairs = [(int(i), int(j)) for i, j in zip(rows[real], cols[real], strict=True)]
    matched_pred = {i for i, _ in pairs}
    matched_gt = {j for _, j in pairs}
    return Match(
        pairs=pairs,
        fp_indices=[i for i in range(num_pred) if i not in matched_pred],
        fn_indices=[j for j in range(num_gt) if j not in matched_gt],
        gating_rejections=rejections,
        matched_ious=[float(iou[i, j]) for i, j in pairs],
    )
