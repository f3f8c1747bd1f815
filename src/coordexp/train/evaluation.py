"""In-training evaluation: rollouts on validation records -> parse -> match -> `rollout/*`
metrics, plus the per-sample records monitor dumps are written from."""

from __future__ import annotations

import numpy as np

from coordexp.codec import CoordCodec
from coordexp.config import Config
from coordexp.data.records import Record
from coordexp.data.render import sorted_objects_bins
from coordexp.eval import evaluate_detections
from coordexp.matching import match_boxes
from coordexp.predict import predict_records

EVAL_KEYS = ("mAP", "AP50", "AP75", "f1", "precision", "recall", "pred_objects",
             "gt_objects_total", "matched", "fp_total", "fn_total", "gating_rejections",
             "f1@0.5", "f1@0.75")


def evaluate_model(model, processor, records: list[Record], cfg: Config) -> tuple[dict, list]:
    return score_predictions(records, predict_records(model, processor, records, cfg), cfg)


def score_predictions(records: list[Record], preds: list[dict], cfg: Config
                      ) -> tuple[dict, list]:
    """`rollout/*` metrics and monitor-dump samples of predictions, one per record."""
    ev = evaluate_detections(records, preds, iou_gate=cfg.rollout.iou_gate,
                             candidate_top_k=cfg.rollout.candidate_top_k,
                             fp_cost=cfg.rollout.fp_cost, fn_cost=cfg.rollout.fn_cost,
                             semantic=cfg.eval.semantic_desc)
    metrics = {f"rollout/{k}": ev.metrics[k] for k in EVAL_KEYS}
    metrics["rollout/matched_maskiou_mean"] = ev.metrics["matched_iou_mean"]
    c = ev.counters
    n = max(1, c["images"])
    metrics |= {"rollout/parse_dropped_invalid": c["parse_dropped_invalid"],
                "rollout/parse_dropped_ambiguous": c["parse_dropped_ambiguous"],
                "rollout/parse_truncated_rate": c["parse_truncated_rate"],
                "rollout/parse_invalid_rollout_rate": c["parse_invalid_rollout"] / n,
                "rollout/sample_valid_pred_rate": c["sample_valid_pred_rate"]}
    metrics |= {f"rollout/{k}": v for k, v in c.items() if k.startswith("coco_counter_")}
    samples = [dump_sample(i, r, p, cfg) for i, (r, p) in enumerate(zip(records, preds,
                                                                        strict=True))]
    return metrics, samples


def dump_sample(index: int, record: Record, pred: dict, cfg: Config) -> dict:
    """One monitor-dump sample (DESIGN.md section 6): boxes in norm1000 bins, emission order."""
    codec = CoordCodec()
    gt = [{"desc": d, "bbox_2d": b} for d, b in sorted_objects_bins(record, codec)]
    pr = [{"desc": o["desc"], "score": o["score"],
           "bbox_2d": codec.box_px_to_bins(o["bbox_2d"], record.width, record.height)}
          for o in pred["objects"]]
    m = match_boxes(np.array([o["bbox_2d"] for o in pr], dtype=float).reshape(-1, 4),
                    np.array([o["bbox_2d"] for o in gt], dtype=float).reshape(-1, 4),
                    candidate_top_k=cfg.rollout.candidate_top_k, iou_gate=cfg.rollout.iou_gate,
                    fp_cost=cfg.rollout.fp_cost, fn_cost=cfg.rollout.fn_cost)
    matched = len(m.pairs)
    precision = matched / len(pr) if pr else float(not gt)
    recall = matched / len(gt) if gt else float(not pr)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    reasons = {k.removeprefix("parse_dropped_"): v for k, v in pred.items()
               if k.startswith("parse_dropped_") and k not in ("parse_dropped_invalid",
                                                               "parse_dropped_ambiguous")}
    return {"sample_id": index, "image": str(record.image_path.resolve()), "width": record.width,
            "height": record.height, "rollout_text": pred.get("raw_text", ""),
            "gt_objects": gt, "pred_objects": pr,
            "match": {"matched_pairs": [list(map(int, x)) for x in m.pairs],
                      "fn_gt_indices": list(map(int, m.fn_indices)),
                      "fp_pred_indices": list(map(int, m.fp_indices))},
            "stats": {"parse_invalid_rollout": bool(pred["parse_invalid_rollout"]),
                      "parse_dropped_invalid": pred["parse_dropped_invalid"],
                      "parse_dropped_ambiguous": pred["parse_dropped_ambiguous"],
                      "parse_truncated": bool(pred["parse_truncated"]),
                      "parse_dropped_invalid_by_reason": reasons,
                      "valid_pred_objects": len(pr), "gt_objects": len(gt), "matched": matched,
                      "precision": precision, "recall": recall, "f1": f1}}
