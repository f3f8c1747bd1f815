"""In-training evaluation: rollouts on validation records -> typed predictions -> the one
evaluation path (`coordexp.eval.evaluate_predictions`) -> `rollout/*` metrics, and monitor-dump
samples built from the same predictions and matches."""

from __future__ import annotations

from coordexp.codec import CoordCodec
from coordexp.config import Config
from coordexp.data.records import Record
from coordexp.eval import EvalOptions, Evaluation, Prediction, evaluate_predictions
from coordexp.eval.f1 import ImageMatch, precision_recall_f1
from coordexp.predict import predict_records

EVAL_KEYS = ("mAP", "AP50", "AP75", "f1", "precision", "recall", "pred_objects",
             "gt_objects_total", "matched", "fp_total", "fn_total", "gating_rejections",
             "f1@0.5", "f1@0.75")


def evaluate_model(model, processor, records: list[Record], cfg: Config) -> tuple[dict, list]:
    """`rollout/*` metrics and monitor-dump samples for the validation records."""
    return score_predictions(records, predict_records(model, processor, records, cfg), cfg)


def score_predictions(records: list[Record], preds: list[Prediction],
                      cfg: Config) -> tuple[dict, list]:
    """Metrics and dump samples of predictions aligned with their records."""
    ev = evaluate_predictions(records, preds, EvalOptions(match=cfg.match,
                                                          semantic=cfg.eval.semantic_desc))
    samples = [dump_sample(i, r, p, m) for i, (r, p, m) in
               enumerate(zip(records, ev.predictions, ev.matches, strict=True))]
    return rollout_metrics(ev), samples


def rollout_metrics(ev: Evaluation) -> dict:
    metrics = {f"rollout/{k}": ev.metrics[k] for k in EVAL_KEYS}
    metrics["rollout/matched_maskiou_mean"] = ev.metrics["matched_iou_mean"]
    c = ev.counters
    n = max(1, c["images"])
    metrics |= {"rollout/parse_dropped_invalid": c["parse_dropped_invalid"],
                "rollout/parse_dropped_ambiguous": c["parse_dropped_ambiguous"],
                "rollout/parse_truncated_rate": c["parse_truncated_rate"],
                "rollout/parse_invalid_rollout_rate": c["parse_invalid_rollout"] / n,
                "rollout/sample_valid_pred_rate": c["sample_valid_pred_rate"]}
    return metrics | {f"rollout/{k}": v for k, v in c.items() if k.startswith("coco_counter_")}


def dump_sample(index: int, record: Record, pred: Prediction, m: ImageMatch) -> dict:
    """One monitor-dump sample (DESIGN.md section 6): boxes in norm1000 bins; GT in record
    order and predictions in emission order, as the evaluation matched them."""
    codec = CoordCodec()
    gt = [{"desc": o.desc, "bbox_2d": codec.box_px_to_bins(o.box_px, record.width, record.height)}
          for o in record.objects]
    pr = [{"desc": d, "score": float(s), "bbox_2d": b} for d, s, b in
          zip(pred.descs, pred.scores, pred.boxes_bins.tolist(), strict=True)]
    match = m.match
    precision, recall, f1 = precision_recall_f1(len(match.pairs), len(pr), len(gt))
    reasons = {k.removeprefix("parse_dropped_"): v for k, v in pred.parse.items()
               if k.startswith("parse_dropped_") and k not in ("parse_dropped_invalid",
                                                               "parse_dropped_ambiguous")}
    return {"sample_id": index, "image": str(record.image_path.resolve()), "width": record.width,
            "height": record.height, "rollout_text": pred.raw_text,
            "gt_objects": gt, "pred_objects": pr,
            "match": {"matched_pairs": [list(map(int, x)) for x in match.pairs],
                      "fn_gt_indices": list(map(int, match.fn_indices)),
                      "fp_pred_indices": list(map(int, match.fp_indices))},
            "stats": {"parse_invalid_rollout": bool(pred.parse["parse_invalid_rollout"]),
                      "parse_dropped_invalid": pred.parse["parse_dropped_invalid"],
                      "parse_dropped_ambiguous": pred.parse["parse_dropped_ambiguous"],
                      "parse_truncated": bool(pred.parse["parse_truncated"]),
                      "parse_dropped_invalid_by_reason": reasons,
                      "valid_pred_objects": len(pr), "gt_objects": len(gt),
                      "matched": len(match.pairs), "precision": precision, "recall": recall,
                      "f1": f1}}
