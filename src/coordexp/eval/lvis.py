"""LVIS federated evaluation: which categories each image can judge, from its GT record.

An LVIS image is checked only for some categories: those with a GT box on it (verified
present) and those listed in `neg_categories` (verified absent). In AP a prediction of any other
category is ignored, neither TP nor FP; one of a negative category is a false positive, and
unmatched predictions of `not_exhaustive_categories` are ignored. faster-coco-eval's lvis_style
applies these rules, from the lists coco_map.py puts on its COCO images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordexp.data.coco import LVIS_KEYS
from coordexp.data.records import Record
from coordexp.errors import UserError
from coordexp.eval.coco_map import Detections


@dataclass(frozen=True)
class Federated:
    """One image's federated labels as category indices."""

    neg: np.ndarray  # [C_neg]
    not_exhaustive: np.ndarray  # [C_ne]


def federated_names(records: list[Record]) -> list[str] | None:
    """Every category name the LVIS keys mention; None when the GT has no LVIS keys."""
    has = [all(k in r.extra for k in LVIS_KEYS.values()) for r in records]
    if not any(has):
        return None
    for r, ok in zip(records, has, strict=True):
        lists = [r.extra.get(k) for k in LVIS_KEYS.values()]
        if not ok or not all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                             for v in lists):
            raise UserError(f"ground truth image {r.image!r}: LVIS records need "
                            f"{' and '.join(LVIS_KEYS.values())} as lists of category names "
                            "on every record (`coordexp data lvis` writes them)")
    return [n for r in records for k in LVIS_KEYS.values() for n in r.extra[k]]


def federated_labels(records: list[Record], index: dict[str, int]) -> list[Federated]:
    """Per image, its negative and not-exhaustive categories as indices into the categories."""
    neg_key, ne_key = LVIS_KEYS.values()
    return [Federated(np.asarray([index[n] for n in r.extra[neg_key]], dtype=np.int64),
                      np.asarray([index[n] for n in r.extra[ne_key]], dtype=np.int64))
            for r in records]


def count_unverified(preds: list[Detections], gts: list[Detections],
                     federated: list[Federated]) -> int:
    """Predictions of a category neither present on nor negative for their image: the ones
    federated AP ignores."""
    return sum(int((~np.isin(p.labels, np.concatenate([g.labels, f.neg])) & (p.labels >= 0)
                    ).sum()) for p, g, f in zip(preds, gts, federated, strict=True))
