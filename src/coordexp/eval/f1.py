"""Matching-based precision / recall / F1: class-agnostic Hungarian matching with the IoU gate
used in training, plus the same matching gated at fixed IoU 0.5 and 0.75 (`f1@0.5`, `f1@0.75`).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def precision_recall_f1(matched: int, num_pred: int, num_gt: int) -> tuple[float, float, float]:
    """P, R, F1 of matched / num_pred / num_gt (summed over images for micro values). Empty
    cases: with no predictions precision is 1 only if there is no GT either (nothing was
    wrongly predicted), with no GT recall is 1 only if nothing was predicted; so an empty
    answer to an empty image scores 1, and any answer to it, or no answer to objects, 0."""
    p = matched / num_pred if num_pred else float(not num_gt)
    r = matched / num_gt if num_gt else float(not num_pred)
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def f1_metrics(per_image: list[dict]) -> dict[str, float | int]:
    """The matching part of metrics.json from the per-image counts; ratios form after the sums."""
    n = {k: sum(r[k] for r in per_image) for k in ("pred_objects", "gt_objects", "matched", "fp",
                                                   "fn", "gating_rejections", "matched_iou_sum")}
    p, r, f = precision_recall_f1(n["matched"], n["pred_objects"], n["gt_objects"])
    out = {"precision": p, "recall": r, "f1": f, "pred_objects": n["pred_objects"],
           "gt_objects_total": n["gt_objects"], "matched": n["matched"], "fp_total": n["fp"],
           "fn_total": n["fn"], "gating_rejections": n["gating_rejections"],
           "matched_iou_mean": n["matched_iou_sum"] / n["matched"] if n["matched"] else 0.0}
    for t in FIXED_THRESHOLDS:
        matched = sum(r[f"matched@{t}"] for r in per_image)
        out[f"f1@{t}"] = precision_recall_f1(matched, n["pred_objects"], n["gt_objects"])[2]
    return out
