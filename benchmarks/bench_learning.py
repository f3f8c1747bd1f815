"""Does the tiny model learn the harder synthetic task? Held-out AP50 / mAP / F1 after a
quarter, a half and all of a CPU-time budget (15, 30 and 60 minutes at the default), per seed.

The task: 2-6 objects per 112 px image, 3 shapes x 4 colours (12 classes), 20-40 % of the
side, placed independently (so some overlap, later shapes drawn over earlier ones). The recipe
is the demo's Stage 1 (tiny Qwen3-VL, ordinal coord init, batch 8, lr 1e-3, sigma 1 px); the
step count is set once from a step time measured here so the cosine schedule ends with the budget,
and the readings at a quarter and a half are mid-schedule evals of that one run (not separate
shorter runs). Target: AP50 >= 0.5 at 60 CPU-minutes on 2 cores. Not in CI; with --minutes
below 60 (or fewer images) the numbers are a smoke run, not a result.

    python benchmarks/bench_learning.py [--minutes 60] [--seeds 1,2] [--out runs/bench_learning]
    python benchmarks/bench_learning.py --minutes 1 --train 400 --val 16 --out /tmp/bl  # smoke

Seeds can run as separate processes side by side (one core each: OMP_NUM_THREADS=1, the same
--step-seconds so they share one plan); a seed whose rows.json exists is read, not rerun, so a
last call with every seed prints the joint table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from coordexp.config import load_config
from coordexp.data.synthetic import SynthSpec, synthesize
from coordexp.demo import RECIPE, measure_step_seconds
from coordexp.train.loop import train

TASK = SynthSpec(image_size=112, min_objects=2, max_objects=6,
                 shapes=("circle", "square", "triangle"),
                 colours=("red", "green", "blue", "yellow"),
                 min_size_frac=0.2, max_size_frac=0.4, crowded_share=0.0)
N_TRAIN, N_VAL = 12000, 256
READINGS = 4  # evals at 1/4, 2/4, 3/4 and 4/4 of the budget
TARGET_AP50 = 0.5


def plan_steps(data: list[str], minutes: float, per_step: float | None) -> tuple[float, int]:
    """(seconds per step, measured here unless given; steps between readings): one plan for
    every seed, so seeds differ in their randomness only, not in how busy the machine was."""
    per_step = per_step or measure_step_seconds(load_config(RECIPE / "stage1.yaml", data))
    return per_step, max(1, int(60 * minutes / per_step) // READINGS)


def run_seed(out: Path, data: list[str], seed: int, minutes: float, per_step: float,
             every: int) -> list[dict]:
    """One Stage-1 run of READINGS * every steps; its eval rows, each with its nominal minute.
    A seed that already finished (its rows.json exists) is read back, not rerun."""
    done = out / f"seed{seed}" / "rows.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(RECIPE / "stage1.yaml", data + [
        f"training.seed={seed}", "rollout.max_new_tokens=128",
        f"training.output_dir={json.dumps(str(out))}", f"training.run_name=seed{seed}",
        f"training.max_steps={READINGS * every}", f"training.max_minutes={1.2 * minutes}",
        f"training.eval_steps={every}", f"training.save_steps={every}"])
    run_dir = train(cfg)
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    # a reading k is the eval at step k * every; a run the time cap stopped early ends with an
    # extra eval, which is shown in the per-seed table but counts for no reading
    evals = [{"seed": seed, "minutes": r["step"] * per_step / 60, "step": r["step"],
             "reading": r["step"] // every if r["step"] % every == 0 else None,
             "AP50": r["rollout/AP50"], "mAP": r["rollout/mAP"], "F1": r["rollout/f1"]}
            for r in rows if r["kind"] == "eval"]
    done.write_text(json.dumps(evals))
    return evals


def spread(values: list[float]) -> str:
    """Mean, and half the range over seeds (the spread of two seeds)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {(max(values) - min(values)) / 2:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="training minutes per seed")
    p.add_argument("--seeds", default="1,2", help="comma-separated training seeds")
    p.add_argument("--out", default="runs/bench_learning")
    p.add_argument("--train", type=int, default=N_TRAIN, help="train images (smoke runs: fewer)")
    p.add_argument("--val", type=int, default=N_VAL, help="held-out images")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="seconds per step to plan with instead of measuring (seeds run as "
                        "separate processes share one plan this way)")
    args = p.parse_args()
    out = Path(args.out)
    if not (out / "data" / "val_coco.json").is_file():
        synthesize(out / "data", args.train, args.val, seed=0, spec=TASK)
    data = [f"data.train={json.dumps(str(out / 'data' / 'train.jsonl'))}",
            f"data.val={json.dumps(str(out / 'data' / 'val.jsonl'))}"]
    per_step, every = plan_steps(data, args.minutes, args.step_seconds)
    source = "given" if args.step_seconds else "measured here"
    print(f"[bench] {per_step:.3f} s/step {source} -> {READINGS * every} steps per seed, "
          f"eval every {every}")
    rows = [r for seed in map(int, args.seeds.split(","))
            for r in run_seed(out, data, seed, args.minutes, per_step, every)]
    full = args.minutes >= 60 and (args.train, args.val) == (N_TRAIN, N_VAL)
    label = "" if full else " (SMOKE RUN, not a result)"
    print(f"\nbench_learning{label}: {len(TASK.shapes)} shapes x {len(TASK.colours)} colours, "
          f"{TASK.min_objects}-{TASK.max_objects} objects, {args.train} train / {args.val} "
          "val images")
    print("| seed | minutes (nominal) | step | AP50 | mAP | F1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['minutes']:.1f} | {r['step']} | {r['AP50']:.3f} | "
              f"{r['mAP']:.3f} | {r['F1']:.3f} |")
    print("\n| reading | AP50 | mAP | F1 |\n|---|---|---|---|")
    for k in range(1, READINGS + 1):
        at = [r for r in rows if r["reading"] == k]
        if at:
            print(f"| {k}/{READINGS} of {args.minutes:g} min (seeds: {len(at)}) | "
                  + " | ".join(spread([r[m] for r in at]) for m in ("AP50", "mAP", "F1")) + " |")
    last = [[r for r in rows if r["seed"] == s][-1]["AP50"] for s in dict.fromkeys(
        r["seed"] for r in rows)]
    reached = all(v >= TARGET_AP50 for v in last)
    verdict = "reached" if reached else "not reached"
    print(f"\nAP50 >= {TARGET_AP50} at {args.minutes:g} min: {verdict}"
          f" (per seed: {', '.join(f'{v:.3f}' for v in last)}){label}")


if __name__ == "__main__":
    main()
