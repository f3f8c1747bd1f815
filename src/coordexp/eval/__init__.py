"""Evaluation: COCO box AP with model scores, and matching-based precision / recall / F1."""

from coordexp.eval.evaluate import (
    METRIC_KEYS,
    EvalOptions,
    Evaluation,
    eval_command,
    evaluate_detections,
    evaluate_predictions,
    evaluate_records,
)
from coordexp.eval.predictions import Prediction

__all__ = ["METRIC_KEYS", "EvalOptions", "Evaluation", "Prediction", "eval_command",
           "evaluate_detections", "evaluate_predictions", "evaluate_records"]
