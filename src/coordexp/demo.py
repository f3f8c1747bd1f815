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

RECIPE = Path(__file__).parent / "configs" / "demo"  # stage1.yaml, stage2_ab.yaml


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
    data = [f"{key}={json.dumps(str(path))}" for key, path in (  # quoted: any path is a string
        ("data.train", out / "data" / "train.jsonl"), ("data.val", out / "data" / "val.jsonl"),
        ("training.output_dir", out))]
    from coordexp.train.loop import train

    s1_minutes = minutes * STAGE1_SHARE
    per_step = measure_step_seconds(load_config(RECIPE / "stage1.yaml", data))
    every = max(10, int(60 * s1_minutes / per_step) // 6)
    steps = 6 * every  # the last eval falls on the last step
    cfg1 = load_config(RECIPE / "stage1.yaml", data + [
        f"training.max_steps={steps}", f"training.max_minutes={1.2 * s1_minutes}",
        f"training.eval_steps={every}", f"training.save_steps={every}"])
    print(f"[demo] Stage 1: {per_step:.3f} s/step measured here -> {steps} steps "
          f"(~{s1_minutes:.1f} min), eval every {every}")
    run1 = train(cfg1)
    s1_ckpt = best_checkpoint(run1)
    s2_minutes = minutes - s1_minutes
    print(f"[demo] Stage 2 AB for {s2_minutes:.1f} min from {s1_ckpt}")
    run2 = train(load_config(RECIPE / "stage2_ab.yaml", data + [
        f"model.path={json.dumps(str(s1_ckpt))}", f"training.max_minutes={s2_minutes}"]))
    rows = [("stage1", r) for r in _eval_rows(run1)] + [("stage2_ab", r) for r in _eval_rows(run2)]
    print("\n" + format_table(rows) + "\n")
    from coordexp.report import report_command

    for run in (run1, run2):
        report_command(str(run), out="", compare=[], window=10, corr=[])
    print(f"[demo] done in {(time.time() - started) / 60:.1f} min; runs: {run1}, {run2}; "
          f"reports: {run1 / 'report' / 'report.html'}, {run2 / 'report' / 'report.html'}")
    return 0
