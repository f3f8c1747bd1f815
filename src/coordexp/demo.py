"""`coordexp demo`: from nothing to a trained tiny detector, its eval table and its report.

Synthetic shapes + a tiny random Qwen3-VL built offline; Stage 1 on the CPU, then from its
best checkpoint two runs of equal training time: Stage 2 AB, and the control (Stage 1 continued
at Stage 2's learning rate); rollout evaluation during each; then the reports. Stage 1 picks
its checkpoint on a selection split drawn apart from the reported validation split, so the
reported numbers carry no selection bias. The task is sized so a 2-core CPU learns to localise
within the time budget: see TASK.
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
N_SELECT = 256  # model-selection images: another seed, never the reported N_VAL
STAGE1_SHARE = 0.6  # of the training minutes; Stage 2 AB and the control get half the rest each

RECIPE = Path(__file__).parent / "configs" / "demo"  # stage1, stage2_ab, stage1_continued


def _eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint with the best eval metric if it was kept, else the last one."""
    last = sorted((run_dir / "checkpoints").glob("step_??????"))[-1]
    best_step = json.loads((last / "trainer_state.json").read_text())["best_step"]
    best = run_dir / "checkpoints" / f"step_{best_step:06d}" if best_step else last
    return best if best.is_dir() else last


def evaluate_checkpoint(ckpt: Path, cfg) -> dict:
    """`rollout/*` metrics of a saved checkpoint on cfg.data.val (no training)."""
    from coordexp.data.records import read_records
    from coordexp.model.qwen_vl import load_vlm
    from coordexp.train.evaluation import evaluate_model

    model, processor, _ = load_vlm(ckpt)
    metrics, _ = evaluate_model(model, processor, read_records(cfg.data.val), cfg)
    return metrics


def format_table(rows: list[tuple[str, dict]]) -> str:
    keys = ["rollout/AP50", "rollout/mAP", "rollout/f1", "rollout/precision", "rollout/recall",
            "rollout/pred_objects", "rollout/gt_objects_total",
            "rollout/parse_invalid_rollout_rate"]
    head = ["stage", "step"] + [k.split("/")[1] for k in keys]
    width = max(len(stage) for stage, _ in rows + [("stage", {})])
    lines = [" | ".join([f"{head[0]:>{width}}"] + [f"{h:>10}" for h in head[1:]])]
    for stage, r in rows:
        cells = [str(r["step"])] + [f"{r.get(k, float('nan')):.3f}" for k in keys]
        lines.append(" | ".join([f"{stage:>{width}}"] + [f"{c:>10}" for c in cells]))
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


def draw_data(out: Path) -> tuple[list[str], list[str]]:
    """The task's train and reported val splits, and a selection split from another seed;
    returns the overrides for the runs that report (val = reported) and for Stage 1
    (val = selection)."""
    synthesize(out / "data", N_TRAIN, N_VAL, seed=0, spec=TASK)
    synthesize(out / "selection", 0, N_SELECT, seed=1, spec=TASK)
    common = [f"{key}={json.dumps(str(path))}" for key, path in (  # quoted: any path is a string
        ("data.train", out / "data" / "train.jsonl"), ("training.output_dir", out))]
    report = common + [f"data.val={json.dumps(str(out / 'data' / 'val.jsonl'))}"]
    select = common + [f"data.val={json.dumps(str(out / 'selection' / 'val.jsonl'))}"]
    return report, select


def train_stage1(select: list[str], minutes: float) -> Path:
    """Stage 1 for `minutes`, its step count set from a step time measured here."""
    from coordexp.train.loop import train

    per_step = measure_step_seconds(load_config(RECIPE / "stage1.yaml", select))
    every = max(10, int(60 * minutes / per_step) // 6)
    steps = 6 * every  # the last eval falls on the last step
    cfg = load_config(RECIPE / "stage1.yaml", select + [
        f"training.max_steps={steps}", f"training.max_minutes={1.2 * minutes}",
        f"training.eval_steps={every}", f"training.save_steps={every}"])
    print(f"[demo] Stage 1: {per_step:.3f} s/step measured here -> {steps} steps "
          f"(~{minutes:.1f} min), eval every {every} on the selection split")
    return train(cfg)


def summary_line(control: dict, stage2: dict) -> str:
    """Stage 2 minus the control at the end of equal training time from the same start."""
    keys = ("rollout/AP50", "rollout/mAP", "rollout/f1")
    diffs = ", ".join(f"{k.split('/')[1]} {stage2[k] - control[k]:+.3f}" for k in keys)
    return (f"[demo] stage2_ab - stage1_continued after equal training time: {diffs} "
            "(one seed: run `coordexp study` for seeds and intervals)")


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
    report, select = draw_data(out)
    from coordexp.train.loop import train

    run1 = train_stage1(select, minutes * STAGE1_SHARE)
    s1_ckpt = best_checkpoint(run1)
    start = evaluate_checkpoint(s1_ckpt, load_config(RECIPE / "stage1.yaml", report))
    start["step"] = int(s1_ckpt.name.removeprefix("step_"))
    each = minutes * (1 - STAGE1_SHARE) / 2
    from_start = [f"model.path={json.dumps(str(s1_ckpt))}", f"training.max_minutes={each}"]
    runs = {}
    for name in ("stage2_ab", "stage1_continued"):
        print(f"[demo] {name} for {each:.1f} min from {s1_ckpt}")
        runs[name] = train(load_config(RECIPE / f"{name}.yaml", report + from_start))
    rows = ([("stage1/sel", r) for r in _eval_rows(run1)] + [("start", start)]
            + [(name, r) for name, run in runs.items() for r in _eval_rows(run)])
    print(f"\n{format_table(rows)}\n[demo] stage1/sel rows: the {N_SELECT} selection images "
          f"that chose the start checkpoint; every other row: the {N_VAL} reported images")
    print(summary_line(_eval_rows(runs["stage1_continued"])[-1], _eval_rows(runs["stage2_ab"])[-1]))
    from coordexp.report import report_command

    all_runs = [run1, *runs.values()]
    for run in all_runs:
        report_command(str(run), out="", compare=[], window=10, corr=[])
    print(f"[demo] done in {(time.time() - started) / 60:.1f} min; runs: "
          f"{', '.join(map(str, all_runs))}; reports: RUN/report/report.html")
    return 0
