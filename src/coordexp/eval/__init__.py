"""Evaluation: COCO box AP with model scores, and matching-based precision / recall / F1."""

from coordexp.eval.evaluate import (
    METRIC_KEYS,
    Evaluation,
    eval_command,
    evaluate_detections,
    evaluate_records,
)

__all__ = ["METRIC_KEYS", "Evaluation", "eval_command", "evaluate_detections", "evaluate_records"]
