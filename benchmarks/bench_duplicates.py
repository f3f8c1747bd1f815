"""Duplicates on the books task: does the Channel-B duplicate unlikelihood remove them?

Protocol (CPU, 32 minutes measured with the defaults; not part of CI):
1. draw the books task (`coordexp data synth --preset books`: the crowded task's shelves with
   ragged tops, so the answer order jumps along a row; --preset picks another task);
2. train Stage 1 (the demo's Stage-1 recipe without its box losses, as the README's crowded
   command) for --stage1-minutes, evaluating and saving a checkpoint 6 times. A tiny model
   repeats boxes mid-way through Stage 1 and less as it learns the task, so the bench starts
   Stage 2 from the checkpoint whose evaluation had the highest near-duplicate share
   (`dup_share`; --stage1-pick last takes the last one). It should be >= 5 % for the
   comparison to mean anything;
3. from that checkpoint, Stage 2 AB (the demo's recipe) for the same training minutes in two
   arms, `stage2_ab.duplicate_ul_weight` 0 and --weight (with `duplicate_ul_span` --span and
   `duplicate_of` --of), for each of --seeds seeds;
4. print per arm the mean and spread (sample standard deviation) over seeds of the
   near-duplicate share, recall, AP50 and F1, raw and guarded (duplicate clusters suppressed).
Target: dup_share < 0.5 % in the weighted arm with recall at most 0.01 below the weight-0 arm.

Every rollout (evaluation and Channel B) decodes under the CoordJSON grammar
(`rollout.constrained: true`): free greedy decoding of a tiny Stage-1 model on this task
writes coord runs without separators, so nothing parses and no duplicate can be seen
(benchmarks/README.md). --free-decoding turns the grammar off.

    python benchmarks/bench_duplicates.py [--out DIR] [--seeds 3] [--stage1-minutes 6]
        [--stage2-minutes 4] [--weight 1.0] [--span token|box] [--of matched|any]
A shortened run (one seed, short budgets) checks that the protocol runs end to end:
    python benchmarks/bench_duplicates.py --seeds 1 --stage1-minutes 2 --stage2-minutes 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from coordexp.artifacts import checkpoint_dir
from coordexp.config import load_config
from coordexp.data.synthetic import PRESETS, synthesize
from coordexp.demo import RECIPE, train_stage1
from coordexp.train.loop import train

KEYS = ("rollout/dup_share", "rollout/dup_pairs_per_image", "rollout/dup_hit_max_new_tokens_rate",
        "rollout/recall", "rollout/precision", "rollout/AP50", "rollout/f1",
        "rollout/guarded/recall", "rollout/guarded/AP50", "rollout/guarded/f1",
        "rollout/pred_objects")


def evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def pick(run_dir: Path, rule: str) -> tuple[Path, dict]:
    """The Stage-1 checkpoint to start from and its eval row: the last one, or the one whose
    eval had the highest near-duplicate share (the later one on a tie)."""
    rows = [r for r in evals(run_dir) if checkpoint_dir(run_dir, r["step"]).is_dir()]
    row = rows[-1] if rule == "last" else max(reversed(rows), key=lambda r: r["rollout/dup_share"])
    return checkpoint_dir(run_dir, row["step"]), row


def common(data: Path, out: Path, args) -> list[str]:
    return [f"data.train={json.dumps(str(data / 'train.jsonl'))}",
            f"data.val={json.dumps(str(data / 'val.jsonl'))}",
            f"training.output_dir={json.dumps(str(out))}", f"data.val_limit={args.val}",
            "training.eval_steps=1000000", "training.save_steps=1000000",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.constrained={str(not args.free_decoding).lower()}"]


# the README's crowded Stage 1: the demo's, less its box losses (on narrow objects CIoU on
# canonicalised boxes holds flipped predictions in the mirrored box; benchmarks/README.md)
NO_BOX_LOSSES = ["coord_soft_ce_w1.bbox_ciou_weight=0", "coord_soft_ce_w1.bbox_smoothl1_weight=0"]


def stage1(data: Path, out: Path, args) -> Path:
    """The demo's Stage 1 (without its box losses unless --stage1-box-losses): its step count
    set from a step time measured here, so the warmup and the cosine decay fit the minutes (a
    huge max_steps cut by the clock would leave the learning rate in its warmup)."""
    extra = [] if args.stage1_box_losses else NO_BOX_LOSSES
    return train_stage1(common(data, out, args) + extra + ["training.save_total_limit=0"],
                        args.stage1_minutes)


def stage2(data: Path, out: Path, ckpt: Path, weight: float, seed: int, args) -> Path:
    name = f"w{weight:g}{f'_{args.span}_{args.of}' if weight else ''}_seed{seed}"
    cfg = load_config(RECIPE / "stage2_ab.yaml", common(data, out, args) + [
        f"model.path={json.dumps(str(ckpt))}", f"training.max_minutes={args.stage2_minutes}",
        f"training.seed={seed}", f"training.run_name={name}",
        f"stage2_ab.duplicate_ul_weight={weight}", f"stage2_ab.duplicate_ul_span={args.span}",
        f"stage2_ab.duplicate_of={args.of}"])
    return train(cfg)


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.4f} +- {sd:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="work folder (default: a temporary one)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="books",
                   help="the synthetic task (`coordexp data synth --preset`)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--stage1-minutes", type=float, default=6.0)
    p.add_argument("--stage2-minutes", type=float, default=4.0)
    p.add_argument("--weight", type=float, default=1.0, help="duplicate_ul_weight of the arm")
    p.add_argument("--span", choices=("token", "box"), default="token",
                   help="duplicate_ul_span of the arm: the one diverging token, or every coord "
                        "bin that keeps the box a near-duplicate")
    p.add_argument("--of", choices=("matched", "any"), default="matched",
                   help="duplicate_of of the arm: repeats of matched predictions only, or of any")
    p.add_argument("--train", type=int, default=12000, help="training images")
    p.add_argument("--val", type=int, default=128, help="evaluation images")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--free-decoding", action="store_true",
                   help="roll out without the CoordJSON grammar (the default decodes under it)")
    p.add_argument("--stage1-box-losses", action="store_true",
                   help="keep the demo recipe's Stage-1 SmoothL1 + CIoU (off by default: they "
                        "leave most crowded-task predictions degenerate)")
    p.add_argument("--stage1-pick", choices=("most-duplicates", "last"),
                   default="most-duplicates", help="the Stage-1 checkpoint Stage 2 starts from")
    p.add_argument("--stage1-run", default="",
                   help="reuse this Stage-1 run directory (its checkpoints and eval rows) "
                        "instead of training one")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_dups_"))
    started = time.perf_counter()
    synthesize(out / "data", args.train, args.val, seed=0, spec=PRESETS[args.preset])
    run1 = Path(args.stage1_run) if args.stage1_run else stage1(out / "data", out, args)
    for row in evals(run1):
        print(f"Stage 1 step {row['step']}: dup_share {row['rollout/dup_share']:.4f}, "
              f"recall {row['rollout/recall']:.4f}, AP50 {row['rollout/AP50']:.4f}")
    ckpt, base = pick(run1, args.stage1_pick)
    print(f"Stage 2 starts from {ckpt.name} ({args.stage1_pick}): " + ", ".join(
        f"{k.removeprefix('rollout/')} {base[k]:.4f}" for k in KEYS))
    print(f"Stage-1 near-duplicate share {base['rollout/dup_share']:.2%} "
          f"({'>=' if base['rollout/dup_share'] >= 0.05 else '<'} 5%: the checkpoint "
          f"{'duplicates' if base['rollout/dup_share'] >= 0.05 else 'barely duplicates'})")
    results: dict[float, list[dict]] = {0.0: [], args.weight: []}
    for seed in range(args.seeds):
        for weight in results:  # the arms alternate, so drifts in machine load hit both
            row = evals(stage2(out / "data", out, ckpt, weight, seed, args))[-1]
            results[weight].append({k: row[k] for k in KEYS} | {"step": row["step"]})
    print(f"\nStage 2 AB, {args.stage2_minutes:g} training minutes per run, {args.seeds} seed(s),"
          f" {args.val} val images; mean +- sd over seeds")
    for key in (*KEYS, "step"):
        cells = [spread([r[key] for r in rows]) for rows in results.values()]
        print(f"{key:38s} " + "   ".join(f"w={w:g}: {c}" for w, c in zip(results, cells,
                                                                          strict=True)))
    summary = {"stage1": {k: base[k] for k in KEYS} | {"step": base["step"],
                                                        "checkpoint": str(ckpt)},
               "arms": {str(w): rows for w, rows in results.items()}, "args": vars(args),
               "minutes": (time.perf_counter() - started) / 60}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{summary['minutes']:.1f} min in all; {out / 'results.json'}")


if __name__ == "__main__":
    main()
