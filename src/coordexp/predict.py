"""Predictions: rollout -> token-aligned parse -> box scores -> one prediction line per record
(the `coordexp eval` input), and `coordexp infer`.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordexp.config import Config, DataConfig, RolloutConfig
from coordexp.data.records import Record, read_records
from coordexp.errors import UserError
from coordexp.eval.predictions import Prediction, box_scores, from_parse
from coordexp.model.qwen_vl import load_vlm
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
    return from_parse(record, result, object_scores(rollout, result, cfg.eval.score), rollout.text,
                      hit_max_new_tokens=rollout.hit_max_new_tokens)


def object_scores(rollout: Rollout, result: ParseResult, score: str) -> list[float]:
    """eval.score: coord_prob | fused | constant (1.0: AP then follows emission order)."""
    if score == "constant":
        return [1.0] * len(result.objects)
    weight = FUSED_DESC_WEIGHT if score == "fused" else 0.0
    return box_scores(rollout.token_logprobs, result.tokens, desc_weight=weight)


def infer_command(model_dir: str | Path, data_path: str | Path, out_path: str | Path, *,
                  batch_size: int, max_new_tokens: int, constrained: bool,
                  field_order: str = "desc_first", repetition_penalty: float = 1.0) -> int:
    """`coordexp infer`: rollouts on every record -> predictions JSONL (written atomically).
    `field_order` must be the one the model was trained with: the grammar and parser use it."""
    if repetition_penalty <= 0:
        raise UserError(f"--repetition-penalty must be > 0, got {repetition_penalty}")
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError(f"--batch-size and --max-new-tokens must be >= 1, got {batch_size} and "
                        f"{max_new_tokens}")
    records = read_records(data_path)
    model, processor, _ = load_vlm(model_dir)
    cfg = Config(data=DataConfig(field_order=field_order),
                 rollout=RolloutConfig(batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       constrained=constrained,
                                       repetition_penalty=repetition_penalty))
    preds = predict_records(model, processor, records, cfg)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for pred in preds:
            f.write(json.dumps(pred.to_line(), ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(summary_line(preds, out))
    return 0


def summary_line(preds: list[Prediction], out: Path) -> str:
    def total(key: str) -> int:
        return sum(p.parse[key] for p in preds)

    return (f"wrote {len(preds)} predictions ({sum(len(p.descs) for p in preds)} objects) "
            f"to {out}; invalid rollouts {total('parse_invalid_rollout')}, "
            f"truncated {total('parse_truncated')}, "
            f"dropped objects {total('parse_dropped_invalid')}")
