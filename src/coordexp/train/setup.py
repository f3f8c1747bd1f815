"""From config to the pieces the loop runs: model + processor, optimizer groups, schedule, step."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from coordexp.codec import CoordCodec
from coordexp.config import Config, TrainingConfig
from coordexp.data.collate import Collator
from coordexp.model.adapter import init_coord_embeddings_ordinal
from coordexp.model.qwen_vl import build_processor, load_vlm, save_vlm
from coordexp.model.tuning import apply_tuning
from coordexp.train.stage1 import stage1_step


def build_model(cfg: Config, run_dir: Path, main: bool):
    """(model, processor): model.path (an adapter checkpoint is merged into its base), or a tiny
    random model saved to run_dir/init_model; then LoRA/DoRA per model.tuning, applied to
    that base directory (a PeftModel; `model.tuning: full` returns the model itself)."""
    base_path = Path(cfg.model.path or run_dir / "init_model")
    if cfg.model.path:
        model, processor, _ = load_vlm(cfg.model.path)
    else:
        model, processor = build_tiny(cfg)
        if main:
            save_vlm(model, processor, base_path)
    coord_ids = CoordCodec().token_ids(processor.tokenizer)
    return apply_tuning(model, cfg.model, coord_ids, base_path), processor


def build_tiny(cfg: Config):
    from coordexp.model.tiny import TinySpec, build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, TinySpec(family=cfg.model.init_tiny), seed=cfg.training.seed)
    if cfg.model.coord_embed_init == "ordinal":
        init_coord_embeddings_ordinal(model, CoordCodec().token_ids(tok), seed=cfg.training.seed)
    return model, build_processor(cfg.model.init_tiny, tok)


def param_groups(model, t: TrainingConfig) -> list[dict]:
    """Separate learning rates for the vision tower, the aligner (merger) and the LM."""
    groups = {"vit": [], "aligner": [], "llm": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".visual." in f".{name}" and "merger" in name:
            groups["aligner"].append(p)
        elif ".visual." in f".{name}":
            groups["vit"].append(p)
        else:
            groups["llm"].append(p)
    lrs = {"vit": t.vit_lr, "aligner": t.aligner_lr, "llm": t.learning_rate}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def build_optimizer(model, t: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, t), weight_decay=t.weight_decay,
                             betas=(0.9, 0.98))


def warmup_steps(t: TrainingConfig) -> int:
    return max(1, round(t.warmup_ratio * t.max_steps))


def decay_progress(t: TrainingConfig, step: int) -> float:
    """The share of the cosine decay done at `step` (0 until the warmup ends, 1 at max_steps)."""
    warmup = warmup_steps(t)
    return min(1.0, max(0.0, (step - warmup) / max(1, t.max_steps - warmup)))


def build_scheduler(optimizer, t: TrainingConfig):
    """Linear warmup, then cosine decay to min_lr_ratio x the base rate."""
    warmup = warmup_steps(t)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = decay_progress(t, step)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_step_fn(cfg: Config, model, collator: Collator):
    """step_fn(records, optimizer_step) -> StepOutput, on the transformers model (under PEFT
    its adapter layers sit in place, so the step needs no PEFT wrapper)."""
    coord_ids = torch.tensor(collator.codec.token_ids(collator.tokenizer))
    if cfg.training.stage == "stage2_ab":
        from coordexp.train.stage2 import Stage2Step

        return Stage2Step(model, collator, cfg, coord_ids)
    device = next(model.parameters()).device
    coord_ids = coord_ids.to(device)
    return lambda records, step: stage1_step(model, collator(records).to(device), cfg, coord_ids)
