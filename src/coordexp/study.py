"""`coordexp study SPEC.yaml`: variants (config overrides) trained from one shared starting
checkpoint for an equal budget each, over several seeds; one table of means, spreads and
paired differences against the control arm with bootstrap intervals. Resumable: an arm with a
`result.json` is not rerun, an unfinished one restarts from the shared checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import bootstrap

from coordexp.config import load_config, read_yaml
from coordexp.errors import UserError
from coordexp.files import write_text_atomic

# (table label, logged eval key); near_dup is computed from the final monitor dump
METRICS = (("AP50", "rollout/AP50"), ("mAP", "rollout/mAP"), ("F1", "rollout/f1"),
           ("precision", "rollout/precision"), ("recall", "rollout/recall"),
           ("near_dup", "near_dup"), ("invalid", "rollout/parse_invalid_rollout_rate"))
NEAR_DUP_IOU = 0.9
# keys the study sets for every arm; an arm that overrides one would break the comparison
START_OWNED = ("training.output_dir", "training.run_name", "data.train", "data.val")
ARM_OWNED = START_OWNED + ("model.path", "model.init_tiny", "training.seed", "training.max_steps",
                           "training.max_minutes", "training.eval_at_end", "monitor_dump.enabled",
                           "monitor_dump.max_samples")
RESERVED = ("data", "start", "compare")  # folders of the study directory itself
SPEC_KEYS = {"output_dir", "data", "start", "budget", "seeds", "control", "arms"}
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Arm:
    name: str
    config: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudySpec:
    output_dir: Path
    data: dict  # {"train": path, "val": path} or {"synth": "demo", "train": n, "val": n}
    start: dict  # {"checkpoint": path} or {"config": path, "overrides": [...]}
    budget: dict  # {"minutes": m} or {"steps": n}
    seeds: tuple[int, ...]
    control: str
    arms: tuple[Arm, ...]


# -- the spec ---------------------------------------------------------------------------------
def _need(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise UserError(f"{path}: {message}")


def _overrides(value, path: Path, key: str, owned: tuple[str, ...]) -> tuple[str, ...]:
    _need(isinstance(value, list) and all(isinstance(v, str) for v in value), path,
          f"'{key}' must be a list of key=value strings")
    owned = [v for v in value if v.split("=", 1)[0].strip() in owned]
    _need(not owned, path, f"'{key}' sets {owned}, which the study sets itself")
    return tuple(value)


def load_spec(path: str | Path, output_dir: str = "") -> StudySpec:
    """Read and check a study spec; paths in it are relative to the spec file."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = set(raw) - SPEC_KEYS
    _need(not unknown, path, f"unknown keys {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    missing = SPEC_KEYS - set(raw) - ({"output_dir"} if output_dir else set())
    _need(not missing, path, f"missing keys {sorted(missing)}")
    budget, seeds = raw["budget"], raw["seeds"]
    _need(isinstance(budget, dict) and len(budget) == 1 and set(budget) <= {"minutes", "steps"}
          and isinstance(next(iter(budget.values())), int | float)
          and next(iter(budget.values())) > 0, path,
          "'budget' must be {minutes: M} or {steps: N}, positive")
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)
          and len(set(seeds)) == len(seeds), path, "'seeds' must be a list of distinct integers")
    arms = _load_arms(raw["arms"], path)
    _need(raw["control"] in [a.name for a in arms], path,
          f"'control' ({raw['control']}) must name an arm")
    return StudySpec(Path(output_dir or raw["output_dir"]), _load_data(raw["data"], path),
                     _load_start(raw["start"], path), budget, tuple(seeds), raw["control"], arms)


def _load_data(data, path: Path) -> dict:
    _need(isinstance(data, dict) and (set(data) in ({"train", "val"},
                                                   {"synth", "train", "val"})), path,
          "'data' must be {train: PATH, val: PATH} or {synth: demo, train: N, val: N}")
    if "synth" not in data:
        return {k: str(path.resolve().parent / v) for k, v in data.items()}
    _need(data["synth"] == "demo" and all(isinstance(data[k], int) and data[k] > 0
                                         for k in ("train", "val")), path,
          "'data.synth' must be 'demo' with positive train and val counts")
    return data


def _load_start(start, path: Path) -> dict:
    _need(isinstance(start, dict) and set(start) in ({"checkpoint"}, {"config"},
                                                     {"config", "overrides"}), path,
          "'start' must be {checkpoint: DIR} or {config: YAML, overrides: [...]}")
    return {k: (_overrides(v, path, "start.overrides", START_OWNED) if k == "overrides"
                else path.resolve().parent / v) for k, v in start.items()}


def _load_arms(arms, path: Path) -> tuple[Arm, ...]:
    _need(isinstance(arms, dict) and arms, path, "'arms' must map arm names to {config, overrides}")
    parsed = []
    for name, arm in arms.items():
        _need(isinstance(name, str) and re.fullmatch(r"[\w.-]+", name) is not None
              and name not in RESERVED, path, f"arm name {name!r} must be letters, digits, "
              f"'_', '-' or '.' (it names a folder), and none of {RESERVED}")
        _need(isinstance(arm, dict) and "config" in arm and set(arm) <= {"config", "overrides"},
              path, f"arm '{name}' must be {{config: YAML, overrides: [...]}}")
        parsed.append(Arm(name, path.resolve().parent / arm["config"],
                          _overrides(arm.get("overrides", []), path, f"arms.{name}.overrides",
                                     ARM_OWNED)))
    return tuple(parsed)


# -- running ----------------------------------------------------------------------------------
def prepare_data(spec: StudySpec) -> tuple[str, str]:
    """(train, val) record files; a synthetic task is drawn once into the study directory."""
    if "synth" not in spec.data:
        return spec.data["train"], spec.data["val"]
    from coordexp.data.synthetic import synthesize
    from coordexp.demo import TASK

    out = spec.output_dir / "data"
    if not (out / "val_coco.json").is_file():  # written last by synthesize
        synthesize(out, spec.data["train"], spec.data["val"], seed=0, spec=TASK)
    return str(out / "train.jsonl"), str(out / "val.jsonl")


def quoted(key: str, value) -> str:
    return f"{key}={json.dumps(str(value))}"  # any path or name as a string


def finished(run_dir: Path) -> dict | None:
    """The result of a finished run; an unfinished one is removed (it restarts)."""
    if (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    if run_dir.exists():
        print(f"[study] {run_dir} was not finished; restarting it")
        shutil.rmtree(run_dir)
    return None


def start_checkpoint(spec: StudySpec, data: list[str]) -> Path:
    """The one checkpoint every arm starts from: given, or the last of one shared start run
    (the last, not the best: choosing on the reported images would bias every arm)."""
    if "checkpoint" in spec.start:
        return spec.start["checkpoint"]
    from coordexp.artifacts import latest_checkpoint
    from coordexp.train.loop import train

    run_dir = spec.output_dir / "start"
    done = finished(run_dir)
    if done is None:
        print(f"[study] training the shared start from {spec.start['config']}")
        cfg = load_config(spec.start["config"], [*spec.start.get("overrides", ()), *data,
                                                 quoted("training.output_dir", spec.output_dir),
                                                 "training.run_name=start"])
        done = {"checkpoint": str(latest_checkpoint(train(cfg)).resolve())}
        write_text_atomic(run_dir / "result.json", json.dumps(done))
    return Path(done["checkpoint"])


def budget_overrides(budget: dict) -> list[str]:
    """Equal steps, or equal training minutes (the step cap then never binds)."""
    if "steps" in budget:
        return [f"training.max_steps={int(budget['steps'])}", "training.max_minutes=0"]
    return ["training.max_steps=1000000000", f"training.max_minutes={budget['minutes']}"]


def arm_config(spec: StudySpec, arm: Arm, seed: int, start: Path, data: list[str],
               n_val: int):
    """The arm's config with what the study owns: start, seed, budget, data, place, final eval."""
    cfg = load_config(arm.config, [*arm.overrides, *data, *budget_overrides(spec.budget),
                                   quoted("model.path", start), 'model.init_tiny=""',
                                   f"training.seed={seed}",
                                   quoted("training.output_dir", spec.output_dir / arm.name),
                                   f"training.run_name=seed{seed}", "training.eval_at_end=true",
                                   "monitor_dump.enabled=true",
                                   f"monitor_dump.max_samples={n_val}"])
    t = cfg.training
    if "minutes" in spec.budget and (t.warmup_ratio != 0 or t.min_lr_ratio != 1):
        raise UserError(f"arm '{arm.name}': a minutes budget needs a constant learning rate "
                        "(training.warmup_ratio: 0, training.min_lr_ratio: 1), since its step "
                        "count is not known in advance; or use budget: {steps: N}")
    return cfg


def arm_result(run_dir: Path, arm: str, seed: int) -> dict:
    """The last eval row, the near-duplicate share of its dump, and the budget spent."""
    from coordexp.artifacts import latest_checkpoint

    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    state = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    dump = json.loads((run_dir / "monitor_dumps" / f"step_{final['step']:06d}.json").read_text())
    return {"arm": arm, "seed": seed, "step": state["step"],
            "train_minutes": state["train_seconds"] / 60, "near_dup": near_dup_share(dump),
            **{key: final[key] for _, key in METRICS if key in final}}


def near_dup_share(dump: dict) -> float:
    """Near-duplicate pairs (same desc, IoU >= 0.9) per predicted object, over the dump."""
    from coordexp.diagnostics import near_duplicate_pairs

    pairs = sum(near_duplicate_pairs([o["bbox_2d"] for o in s["pred_objects"]],
                                     [o["desc"] for o in s["pred_objects"]], NEAR_DUP_IOU)
                for s in dump["samples"])
    preds = sum(len(s["pred_objects"]) for s in dump["samples"])
    return pairs / preds if preds else 0.0


def pin_spec(spec_path: Path, spec: StudySpec) -> None:
    """A study directory belongs to one spec (as resolved, `extends` included): resuming with
    another one is an error."""
    resolved = read_yaml(Path(spec_path))
    pinned = spec.output_dir / "spec.yaml"
    if pinned.is_file() and yaml.safe_load(pinned.read_text()) != resolved:
        raise UserError(f"{spec.output_dir} holds a study with another spec ({pinned}); "
                        "pass another output_dir")
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(pinned, yaml.safe_dump(resolved, sort_keys=False))


def run_study(spec_path: str | Path, output_dir: str = "") -> list[dict]:
    """Every (arm, seed) not yet finished, then the table and the comparison report."""
    from coordexp.data.records import read_records
    from coordexp.train.loop import train

    spec = load_spec(spec_path, output_dir)
    pin_spec(Path(spec_path), spec)
    train_path, val_path = prepare_data(spec)
    data = [quoted("data.train", train_path), quoted("data.val", val_path)]
    n_val = len(read_records(val_path))
    for arm in spec.arms:  # every arm's config errors before any training
        arm_config(spec, arm, spec.seeds[0], spec.output_dir / "start", data, n_val)
    start = start_checkpoint(spec, data)
    results = []
    for seed in spec.seeds:  # seed-major: a stopped study holds complete pairs
        for arm in spec.arms:
            run_dir = spec.output_dir / arm.name / f"seed{seed}"
            result = finished(run_dir)
            if result is None:
                print(f"[study] arm {arm.name}, seed {seed}, from {start}")
                run_dir = train(arm_config(spec, arm, seed, start, data, n_val))
                result = arm_result(run_dir, arm.name, seed)
                write_text_atomic(run_dir / "result.json", json.dumps(result, indent=1))
            results.append(result)
    return results


# -- the table --------------------------------------------------------------------------------
def paired_difference(arm: list[float], control: list[float], seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """Mean of arm - control over paired seeds, and its percentile-bootstrap interval over
    those differences (NaN bounds with fewer than two pairs)."""
    diffs = np.asarray(arm, dtype=float) - np.asarray(control, dtype=float)
    mean = float(diffs.mean()) if len(diffs) else float("nan")
    if len(diffs) < 2 or not np.isfinite(diffs).all():
        return mean, float("nan"), float("nan")
    ci = bootstrap((diffs,), np.mean, confidence_level=level, n_resamples=BOOTSTRAP_RESAMPLES,
                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return mean, float(ci.low), float(ci.high)


def summarize(results: list[dict], arms: list[str], control: str) -> list[dict]:
    """One row per (metric, arm): n, mean, sample sd, and the paired difference to control."""
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    rows = []
    for label, key in METRICS:
        for arm in arms:
            values = [by[arm, s].get(key, float("nan")) for s in seeds if (arm, s) in by]
            pairs = [(by[arm, s].get(key, float("nan")), by[control, s].get(key, float("nan")))
                     for s in seeds if (arm, s) in by and (control, s) in by]
            diff = (paired_difference(*zip(*pairs, strict=True)) if pairs and arm != control
                    else (float("nan"),) * 3)
            rows.append({"metric": label, "arm": arm, "n": len(values),
                         "mean": float(np.mean(values)) if values else float("nan"),
                         "sd": float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"),
                         "diff": diff[0], "low": diff[1], "high": diff[2]})
    return rows


def format_study_table(rows: list[dict], results: list[dict], arms: list[str],
                       control: str) -> str:
    """Markdown: the metric table, then the budget each arm actually spent."""
    def num(v: float) -> str:
        return "n/a" if np.isnan(v) else f"{v:.3f}"

    def signed(v: float) -> str:
        return "n/a" if np.isnan(v) else f"{v:+.3f}"

    lines = [f"| metric | arm | seeds | mean | sd | arm - {control} | 95% CI |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "n/a" if np.isnan(r["low"]) else f"[{signed(r['low'])}, {signed(r['high'])}]"
        lines.append(f"| {r['metric']} | {r['arm']} | {r['n']} | {num(r['mean'])} | "
                     f"{num(r['sd'])} | {signed(r['diff'])} | {ci} |")
    lines += ["", "| arm | seeds | steps (mean) | training minutes (mean) |", "|---|---|---|---|"]
    for arm in arms:
        mine = [r for r in results if r["arm"] == arm]
        if mine:
            lines.append(f"| {arm} | {len(mine)} | {np.mean([r['step'] for r in mine]):.0f} | "
                         f"{np.mean([r['train_minutes'] for r in mine]):.2f} |")
    return "\n".join(lines)


def study_command(spec_path: str, output_dir: str = "") -> int:
    """`coordexp study`: run what is left, write study_table.md / study.json, compare plots."""
    from coordexp.report import report_command

    spec = load_spec(spec_path, output_dir)
    results = run_study(spec_path, output_dir)
    arms = [a.name for a in spec.arms]
    rows = summarize(results, arms, spec.control)
    table = format_study_table(rows, results, arms, spec.control)
    out = spec.output_dir
    write_text_atomic(out / "study_table.md", table + "\n")
    write_text_atomic(out / "study.json", json.dumps({"results": results, "table": rows}, indent=1))
    first = [str(out / arm / f"seed{spec.seeds[0]}") for arm in arms]
    report_command(None, out=str(out / "compare"), compare=first, window=10, corr=[])
    print(f"\n{table}\n\nnear_dup: near-duplicate pairs (same desc, IoU >= {NEAR_DUP_IOU}) per "
          f"predicted object; invalid: share of invalid rollouts; intervals: percentile "
          f"bootstrap over the paired seeds.\n[study] {out / 'study_table.md'}; plots of seed "
          f"{spec.seeds[0]}: {out / 'compare'}")
    return 0
