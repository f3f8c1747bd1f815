"""Monitor-dump analysis: per-sample counts, precision/recall/F1 from the stored match, class
histograms, near-duplicate pairs, (y1, x1) ordering violations; per-dump summaries, the worst
samples by F1 and crowded scenes (definitions: upstream.md section 10)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from coordexp.diagnostics import near_duplicate_pairs, ordering_violations
from coordexp.eval.f1 import precision_recall_f1

DUP_THRESHOLDS = (0.9, 0.95)
CROWDED_MIN = 5  # a scene is crowded when one class has at least this many GT objects
WORST_COUNT = 3


def class_hist(objects: list[dict]) -> dict[str, int]:
    """desc -> count, most common first (ties by name)."""
    counts = Counter(o["desc"] for o in objects)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def analyze_sample(sample: dict) -> dict:
    """The report.json record of one dumped sample."""
    gt, pred = sample["gt_objects"], sample["pred_objects"]
    matched = len(sample["match"]["matched_pairs"])
    precision, recall, f1 = precision_recall_f1(matched, len(pred), len(gt))
    boxes = [o["bbox_2d"] for o in pred]
    descs = [o["desc"] for o in pred]
    d90, d95 = (near_duplicate_pairs(boxes, descs, t) for t in DUP_THRESHOLDS)
    return {"sample_id": sample["sample_id"], "gt_objects": len(gt), "pred_objects": len(pred),
            "matched": matched, "precision": precision, "recall": recall, "f1": f1,
            "near_dup_pairs_iou90": d90, "near_dup_pairs_iou95": d95,
            "ordering_violations": ordering_violations(boxes),
            "pred_class_hist": class_hist(pred), "gt_class_hist": class_hist(gt)}


def summarize_dump(dump: dict, records: list[dict]) -> dict:
    """Per-dump means and parse counts (the seed note's monitor-subset table)."""
    stats = [s.get("stats", {}) for s in dump["samples"]]
    n = len(records)

    def mean(key: str) -> float | None:
        return float(np.mean([r[key] for r in records])) if n else None

    return {"samples": n, "mean_gt_objects": mean("gt_objects"),
            "mean_pred_objects": mean("pred_objects"), "mean_matched": mean("matched"),
            "mean_f1": mean("f1"),
            "invalid": sum(bool(s.get("parse_invalid_rollout")) for s in stats),
            "truncated": sum(bool(s.get("parse_truncated")) for s in stats),
            "dropped_invalid": sum(int(s.get("parse_dropped_invalid", 0)) for s in stats),
            "dropped_ambiguous": sum(int(s.get("parse_dropped_ambiguous", 0)) for s in stats),
            "near_dup_pairs_iou90": sum(r["near_dup_pairs_iou90"] for r in records),
            "near_dup_pairs_iou95": sum(r["near_dup_pairs_iou95"] for r in records),
            "ordering_violations": sum(r["ordering_violations"] for r in records)}


def analyze_dumps(dumps: list[dict]) -> list[dict]:
    """report.json `dumps`: [{step, samples: [analyze_sample...], summary}] in step order."""
    out = []
    for dump in dumps:
        records = [analyze_sample(s) for s in dump["samples"]]
        out.append({"step": dump["global_step"], "samples": records,
                    "summary": summarize_dump(dump, records)})
    return out


def duplicate_classes(sample: dict) -> list[dict]:
    """Classes with near-duplicate predictions: desc, count, pairs at each threshold."""
    by_desc: dict[str, list] = {}
    for o in sample["pred_objects"]:
        by_desc.setdefault(o["desc"], []).append(o["bbox_2d"])
    rows = []
    for desc, boxes in by_desc.items():
        pairs = [near_duplicate_pairs(boxes, [desc] * len(boxes), t) for t in DUP_THRESHOLDS]
        if pairs[0]:
            rows.append({"desc": desc, "pred": len(boxes), "iou90": pairs[0], "iou95": pairs[1]})
    return sorted(rows, key=lambda r: (-r["iou90"], r["desc"]))


def worst_samples(analyzed: list[dict], count: int = WORST_COUNT) -> list[dict]:
    """The latest dump's lowest-F1 samples (F1 < 1), with their F1 at every dump step."""
    if not analyzed:
        return []
    latest = [r for r in analyzed[-1]["samples"] if r["f1"] < 1.0]
    worst = sorted(latest, key=lambda r: (r["f1"], str(r["sample_id"])))[:count]
    history = {}
    for dump in analyzed:
        for r in dump["samples"]:
            history.setdefault(r["sample_id"], []).append((dump["step"], r["f1"]))
    return [r | {"f1_history": history[r["sample_id"]]} for r in worst]


def crowded_scenes(sample: dict, min_count: int = CROWDED_MIN) -> dict | None:
    """The most common GT class when it has >= min_count objects: its GT, predicted and matched
    counts in this sample; None otherwise."""
    hist = class_hist(sample["gt_objects"])
    if not hist:
        return None
    desc, count = next(iter(hist.items()))
    if count < min_count:
        return None
    gt_descs = [o["desc"] for o in sample["gt_objects"]]
    matched = sum(gt_descs[j] == desc for _, j in sample["match"]["matched_pairs"])
    predicted = sum(o["desc"] == desc for o in sample["pred_objects"])
    return {"sample_id": sample["sample_id"], "desc": desc, "gt": count, "pred": predicted,
            "matched": matched, "gt_total": len(gt_descs)}


def sample_outcomes(sample: dict) -> tuple[set[int], set[int]]:
    """(matched prediction indices, matched GT indices) from the stored match."""
    pairs = sample["match"]["matched_pairs"]
    return {int(p) for p, _ in pairs}, {int(g) for _, g in pairs}
