"""Matching-based precision / recall / F1: class-agnostic Hungarian matching with the IoU gate
used in training, plus the same matching gated at fixed IoU 0.5 and 0.75 (`f1@0.5`, `f1@0.75`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from coordexp.matching import Match, MatchConfig, build_pair_table, count_matches, match_pair_table

FIXED_THRESHOLDS = (0.5, 0.75)


@dataclass(frozen=True)
class ImageMatch:
    """The gated match of one image, and the number matched at each fixed threshold."""

    match: Match
    matched_at: dict[float, int]


def match_images(preds_xyxy: list[np.ndarray], gts_xyxy: list[np.ndarray],
                 cfg: MatchConfig) -> list[ImageMatch]:
    """Match every image ([P_i, 4] vs [G_i, 4]) at the gate and at each fixed threshold, from
    one table of pair IoUs and candidates."""
    table = build_pair_table(preds_xyxy, gts_xyxy, cfg.candidate_top_k)
    costs = {"fp_cost": cfg.fp_cost, "fn_cost": cfg.fn_cost}
    gated = match_pair_table(table, iou_gate=cfg.iou_gate, **costs)
    at = {t: count_matches(table, iou_gate=t, **costs).tolist() for t in FIXED_THRESHOLDS}
    return [ImageMatch(m, {t: at[t][i] for t in FIXED_THRESHOLDS}) for i, m in enumerate(gated)]


@dataclass
class F1Counts:
    """Sums over images; ratios are formed only in f1_metrics, after all sums are in."""

    pred_objects: int = 0
    gt_objects_total: int = 0
    matched: int = 0
    fp_total: int = 0
    fn_total: int = 0
    gating_rejections: int = 0
    matched_iou_sum: float = 0.0
    matched_at: dict[float, int] = field(default_factory=lambda: dict.fromkeys(FIXED_THRESHOLDS, 0))

    def add(self, num_pred: int, num_gt: int, m: ImageMatch) -> None:
        self.pred_objects += num_pred
        self.gt_objects_total += num_gt
        self.matched += len(m.match.pairs)
        self.fp_total += len(m.match.fp_indices)
        self.fn_total += len(m.match.fn_indices)
        self.gating_rejections += m.match.gating_rejections
        self.matched_iou_sum += sum(m.match.matched_ious)
        for t, n in m.matched_at.items():
            self.matched_at[t] += n


def precision_recall_f1(matched: int, num_pred: int, num_gt: int) -> tuple[float, float, float]:
    """P, R, F1 of matched / num_pred / num_gt (summed over images for micro values). Empty
    cases: with no predictions precision is 1 only if there is no GT either (nothing was
    wrongly predicted), with no GT recall is 1 only if nothing was predicted; so an empty
    answer to an empty image scores 1, and any answer to it, or no answer to objects, 0."""
    p = matched / num_pred if num_pred else float(not num_gt)
    r = matched / num_gt if num_gt else float(not num_pred)
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def f1_metrics(c: F1Counts) -> dict[str, float | int]:
    """The matching part of metrics.json."""
    p, r, f = precision_recall_f1(c.matched, c.pred_objects, c.gt_objects_total)
    out = {"precision": p, "recall": r, "f1": f, "pred_objects": c.pred_objects,
           "gt_objects_total": c.gt_objects_total, "matched": c.matched, "fp_total": c.fp_total,
           "fn_total": c.fn_total, "gating_rejections": c.gating_rejections,
           "matched_iou_mean": c.matched_iou_sum / c.matched if c.matched else 0.0}
    for t, n in c.matched_at.items():
        out[f"f1@{t}"] = precision_recall_f1(n, c.pred_objects, c.gt_objects_total)[2]
    return out
