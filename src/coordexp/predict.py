"""Predictions: rollout -> token-aligned parse -> box scores -> one Prediction per record (the
pred JSONL line `coordexp eval` reads). `Detector` and `coordexp infer` are built on these.
"""

from __future__ import annotations

from coordexp.config import Config
from coordexp.data.records import Record
from coordexp.eval.predictions import Prediction, box_scores, from_parse
from coordexp.parsing import ParseResult, parse_coordjson_tokens
from coordexp.rollout import Rollout, generate_rollouts

FUSED_DESC_WEIGHT = 0.5  # eval.score = fused: (1 - w) * coord geometric mean + w * desc prob


def predict_records(model, processor, records: list[Record], cfg: Config, *,
                    progress: bool = True) -> list[Prediction]:
    """Rollout -> token-aligned parse -> box scores -> one Prediction per record."""
    rollouts = generate_rollouts(model, processor, records, cfg.rollout, progress=progress,
                                 seed=cfg.training.seed, field_order=cfg.data.field_order)
    return [prediction(r, ro, cfg) for r, ro in zip(records, rollouts, strict=True)]


def prediction(record: Record, rollout: Rollout, cfg: Config) -> Prediction:
    result = parse_coordjson_tokens(rollout.pieces, field_order=cfg.data.field_order)
    return from_parse(record, result, object_scores(rollout, result, cfg.eval.score), rollout.text)


def object_scores(rollout: Rollout, result: ParseResult, score: str) -> list[float]:
    """eval.score: coord_prob | fused | constant (1.0: AP then follows emission order)."""
    if score == "constant":
        return [1.0] * len(result.objects)
    weight = FUSED_DESC_WEIGHT if score == "fused" else 0.0
    return box_scores(rollout.token_logprobs, result.tokens, desc_weight=weight)
