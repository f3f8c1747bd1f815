"""Duplicate statistics of predictions and the guarded (duplicate-suppressed) view.

Two predictions of one image are a near-duplicate pair when they have the same desc and box
IoU >= a threshold (0.9 by default; reference section 10). Duplicate clusters are the connected
components of those pairs; the guarded view keeps the highest-scored member of each cluster
(the earliest emitted on a tie), so raw vs guarded metrics show what duplicates cost.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from coordexp.boxes import box_iou
from coordexp.eval.predictions import Prediction

DUPLICATE_IOU = 0.9
GUARDED_KEYS = ("mAP", "AP50", "AP75", "f1", "precision", "recall", "pred_objects")


def duplicate_pairs(boxes_xyxy: np.ndarray, descs: list[str], iou_threshold: float) -> np.ndarray:
    """[D, 2] index pairs i < j with the same desc and IoU >= iou_threshold; boxes [P, 4].

    Bounded work: IoU >= t > 0 needs the intersection as wide as t x each box, so in x1 order a
    partner starts at most (1 - t) x width after a box; only that window of the same desc is
    scored, never the P x P matrix."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)  # [P, 4]
    if len(descs) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    codes = {d: i for i, d in enumerate(dict.fromkeys(descs))}
    width = np.clip(boxes[:, 2] - boxes[:, 0], 0, None)  # [P]
    stride = 2 * (np.ptp(boxes[:, 0]) + width.max() + 1)  # keeps descs apart in the sort key
    key = np.array([codes[d] for d in descs]) * stride + boxes[:, 0]  # [P]
    order = np.argsort(key, kind="stable")
    key, reach = key[order], (1 - iou_threshold) * width[order]
    assert iou_threshold > 0, "a duplicate needs overlap (config keeps the threshold in (0, 1])"
    ends = np.searchsorted(key, key + reach, side="right")  # [P] window ends
    sorted_boxes = torch.as_tensor(boxes[order])
    pairs = []
    for a in np.flatnonzero(ends > np.arange(len(key)) + 1).tolist():
        iou = box_iou(sorted_boxes[a:a + 1], sorted_boxes[a + 1:ends[a]])[0].numpy()
        b = a + 1 + np.flatnonzero(iou >= iou_threshold)
        pairs.append(np.stack([np.minimum(order[a], order[b]), np.maximum(order[a], order[b])], 1))
    out = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


def duplicate_clusters(boxes_xyxy: np.ndarray, descs: list[str],
                       iou_threshold: float) -> list[list[int]]:
    """Clusters of two or more predictions joined by near-duplicate pairs, each in emission
    order, ordered by their first member."""
    pairs = duplicate_pairs(boxes_xyxy, descs, iou_threshold)
    n = len(descs)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def suppressed_indices(pred: Prediction, iou_threshold: float = DUPLICATE_IOU) -> list[int]:
    """Predictions the guard removes: every cluster member but the highest-scored one."""
    out = []
    for cluster in duplicate_clusters(pred.boxes_px, pred.descs, iou_threshold):
        keep = max(cluster, key=lambda i: (pred.scores[i], -i))  # earliest wins a tie
        out += [i for i in cluster if i != keep]
    return sorted(out)


def guard_prediction(pred: Prediction, iou_threshold: float = DUPLICATE_IOU) -> Prediction:
    """The same prediction with each duplicate cluster reduced to its highest-scored member."""
    drop = set(suppressed_indices(pred, iou_threshold))
    if not drop:
        return pred
    keep = [i for i in range(len(pred.descs)) if i not in drop]
    bins = pred.boxes_bins[keep] if pred.boxes_bins is not None else None
    return dataclasses.replace(pred, descs=[pred.descs[i] for i in keep],
                               boxes_px=pred.boxes_px[keep], scores=pred.scores[keep],
                               boxes_bins=bins)


def image_duplicate_counts(pred: Prediction, iou_threshold: float = DUPLICATE_IOU) -> dict:
    """Per-image counts: near-duplicate pairs, clusters, their largest size, the predictions
    the guard removes."""
    clusters = duplicate_clusters(pred.boxes_px, pred.descs, iou_threshold)
    return {"dup_pairs": len(duplicate_pairs(pred.boxes_px, pred.descs, iou_threshold)),
            "dup_clusters": len(clusters),
            "dup_max_cluster_size": max(map(len, clusters), default=0),
            "dup_suppressed": sum(len(c) - 1 for c in clusters)}


def duplicate_metrics(preds: list[Prediction | None],
                      iou_threshold: float = DUPLICATE_IOU) -> dict[str, float]:
    """The `dup_*` statistics over images (an image without a prediction counts as empty):

    dup_pairs_per_image, dup_pairs_per_pred (pairs / predictions), dup_share (predictions the
    guard removes / predictions: the near-duplicate share of predictions), dup_clusters_per_image,
    dup_max_cluster_size (largest over images) and dup_hit_max_new_tokens_rate (rollouts that
    stopped at the token budget / images).
    """
    present = [p for p in preds if p is not None]
    counts = [image_duplicate_counts(p, iou_threshold) for p in present]
    images, objects = max(1, len(preds)), sum(len(p.descs) for p in present)

    def total(key: str) -> int:
        return sum(c[key] for c in counts)

    return {"dup_pairs_per_image": total("dup_pairs") / images,
            "dup_pairs_per_pred": total("dup_pairs") / max(1, objects),
            "dup_share": total("dup_suppressed") / max(1, objects),
            "dup_clusters_per_image": total("dup_clusters") / images,
            "dup_max_cluster_size": max((c["dup_max_cluster_size"] for c in counts), default=0),
            "dup_hit_max_new_tokens_rate":
                sum(p.parse["rollout_hit_max_new_tokens"] for p in present) / images}
