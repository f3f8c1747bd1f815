"""`coordexp demo`: from nothing to a trained tiny detector, its eval table and its report.

Synthetic shapes + a tiny random Qwen3-VL built offline; Stage 1 on the CPU, then a short
Stage-2 AB run from the Stage-1 checkpoint; rollout evaluation after each; then the report.
The task is sized so a 2-core CPU learns to localise within the time budget: see TASK.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from coordexp.config import load_config
from coordexp.data.synthetic import SynthSpec, synthesize
from coordexp.errors import UserError

# Calibrated on a 2-core CPU (see docs/ARCHITECTURE.md, "Demo calibration").
TASK = SynthSpec(image_size=112, min_objects=1, max_objects=3,
                 colours=("red", "green", "blue", "yellow"), shapes=("square",),
                 min_size_frac=0.3, max_size_frac=0.6, crowded_share=0.0)
N_TRAIN, N_VAL = 12000, 256  # 3000 overfit; 64 val images made AP50 jump between evals
STAGE1_SHARE = 0.75  # of the training minutes; the rest goes to Stage 2 AB

STAGE1 = {
    "model": {"init_tiny": "qwen3_vl", "coord_embed_init": "ordinal"},
    "training": {"stage": "stage1", "run_name": "stage1", "max_steps": 100_000,
                 "effective_batch_size": 8, "per_device_batch_size": 8,
                 "learning_rate": 1e-3, "vit_lr": 1e-3, "aligner_lr": 1e-3,
                 "warmup_ratio": 0.02, "eval_steps": 100_000, "save_steps": 100_000,
                 "metric_for_best": "rollout/AP50"},
    # one pixel is 999 / 111 = 9 bins at 112 px: sigma of one pixel
    "coord_soft_ce_w1": {"target_sigma": 9.0, "bbox_smoothl1_weight": 1.0,
                         "bbox_ciou_weight": 1.0},
    "rollout": {"batch_size": 32, "max_new_tokens": 64},
    "monitor_dump": {"max_samples": 8},
}
STAGE2 = {
    "training": {"stage": "stage2_ab", "run_name": "stage2_ab", "learning_rate": 1e-4,
                 "vit_lr": 1e-4, "aligner_lr": 1e-4, "warmup_ratio": 0.0, "min_lr_ratio": 1.0,
                 "eval_steps": 200, "save_steps": 200},
    "stage2_ab": {"schedule": {"b_ratio": 0.5}, "n_softctx_iter": 2,
                  "bbox_smoothl1_weight": 2.0, "bbox_ciou_weight": 0.2, "coord_gate_weight": 1.0,
                  "text_gate_weight": 0.1},
    # Stage 2 reads its box weights from stage2_ab: the Stage-1 ones go back to their defaults
    "coord_soft_ce_w1": {"soft_ce_weight": 0.1, "w1_weight": 0.1, "bbox_smoothl1_weight": 0.0,
                         "bbox_ciou_weight": 0.0},
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint with the best eval metric if it was kept, else the last one."""
    last = sorted((run_dir / "checkpoints").glob("step_??????"))[-1]
    best_step = json.loads((last / "trainer_state.json").read_text())["best_step"]
    best = run_dir / "checkpoints" / f"step_{best_step:06d}" if best_step else last
    return best if best.is_dir() else last


def format_table(rows: list[tuple[str, dict]]) -> str:
    keys = ["rollout/AP50", "rollout/mAP", "rollout/f1", "rollout/precision", "rollout/recall",
            "rollout/pred_objects", "rollout/gt_objects_total",
            "rollout/parse_invalid_rollout_rate"]
    head = ["stage", "step"] + [k.split("/")[1] for k in keys]
    lines = [" | ".join(f"{h:>10}" for h in head)]
    for stage, r in rows:
        cells = [stage, str(r["step"])] + [f"{r.get(k, float('nan')):.3f}" for k in keys]
        lines.append(" | ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def measure_step_seconds(cfg, repeats: int = 6) -> float:
    """Median seconds of one Stage-1 optimizer step on this machine (after a warm-up)."""
    import statistics

    import torch

    from coordexp.data.collate import Collator
    from coordexp.data.records import read_records
    from coordexp.model.qwen_vl import build_processor
    from coordexp.model.tiny import TinySpec, build_tiny_model, build_tiny_tokenizer
    from coordexp.train.setup import build_optimizer
    from coordexp.train.stage1 import stage1_step

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, TinySpec(family=cfg.model.init_tiny))
    collator = Collator(build_processor(cfg.model.init_tiny, tok))
    records = read_records(cfg.data.train)[: cfg.training.per_device_batch_size]
    coord_ids = torch.tensor(collator.codec.token_ids(tok))
    optimizer = build_optimizer(model, cfg.training)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        stage1_step(model, collator(records), cfg, coord_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def run_demo(out: str | Path, minutes: float = 10.0) -> int:
    if minutes <= 0:
        raise UserError(f"--minutes must be > 0, got {minutes}")
    out = Path(out)
    if (out / "stage1" / "logging.jsonl").exists():
        raise UserError(f"{out} already holds a demo run; pass another --out")
    started = time.time()
    print(f"[demo] task: {N_TRAIN} synthetic {TASK.image_size}px images with "
          f"{TASK.min_objects}-{TASK.max_objects} shapes each, {len(TASK.colours)} colours x "
          f"{len(TASK.shapes)} shapes = {len(TASK.colours) * len(TASK.shapes)} classes; "
          f"model: tiny random Qwen3-VL; budget {minutes:g} training minutes")
    synthesize(out / "data", N_TRAIN, N_VAL, seed=0, spec=TASK)
    data = {"data": {"train": str(out / "data" / "train.jsonl"),
                     "val": str(out / "data" / "val.jsonl")},
            "training": {"output_dir": str(out)}}
    from coordexp.train.loop import train

    s1_minutes = minutes * STAGE1_SHARE
    cfg1 = load_config(base=_merge(STAGE1, data))
    per_step = measure_step_seconds(cfg1)
    every = max(10, int(60 * s1_minutes / per_step) // 6)
    steps = 6 * every  # the last eval falls on the last step
    cfg1 = load_config(base=_merge(_merge(STAGE1, data), {"training": {
        "max_steps": steps, "max_minutes": 1.2 * s1_minutes, "eval_steps": every,
        "save_steps": every}}))
    print(f"[demo] Stage 1: {per_step:.3f} s/step measured here -> {steps} steps "
          f"(~{s1_minutes:.1f} min), eval every {every}")
    run1 = train(cfg1)
    s1_ckpt = best_checkpoint(run1)
    s2_minutes = minutes - s1_minutes
    stage2 = _merge(_merge(STAGE1, data), STAGE2)
    stage2 = _merge(stage2, {"model": {"init_tiny": "", "path": str(s1_ckpt)},
                             "training": {"max_minutes": s2_minutes}})
    print(f"[demo] Stage 2 AB for {s2_minutes:.1f} min from {s1_ckpt}")
    run2 = train(load_config(base=stage2))
    rows = [("stage1", r) for r in _eval_rows(run1)] + [("stage2_ab", r) for r in _eval_rows(run2)]
    print("\n" + format_table(rows) + "\n")
    from coordexp.report import report_command

    for run in (run1, run2):
        report_command(str(run), out="", compare=[], window=10, corr=[])
    print(f"[demo] done in {(time.time() - started) / 60:.1f} min; runs: {run1}, {run2}; "
          f"reports: {run1 / 'report' / 'report.html'}, {run2 / 'report' / 'report.html'}")
    return 0
