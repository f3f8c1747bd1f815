"""The run directory: metadata, resolved config, logging.jsonl + TensorBoard / Weights & Biases,
monitor dumps, and checkpoints (safetensors weights, atomic saves, exact resume)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import yaml

from coordexp.config import Config, config_to_dict
from coordexp.errors import UserError
from coordexp.files import parse_json, read_text, write_text_atomic

PACKAGES = ("coordexp", "torch", "transformers", "accelerate", "faster-coco-eval", "tokenizers")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_metadata(run_dir: Path, cfg: Config, world_size: int) -> None:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    meta = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git": {"sha": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref",
                                                                     "HEAD"),
                    "dirty": bool(_git("status", "--porcelain"))},
            "seed": cfg.training.seed, "trainer_variant": cfg.training.stage,
            "world_size": world_size, "python": platform.python_version(),
            "packages": versions, "command": sys.argv}
    write_text_atomic(run_dir / "run_metadata.json", json.dumps(meta, indent=2))
    write_text_atomic(run_dir / "resolved_config.yaml",
                      yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def lock_run_dir(run_dir: Path):
    """Hold run_dir/.lock exclusively while this training writes to the run directory; the
    returned open file is the lock (the OS releases it when the process ends, even by kill -9).
    A second training into the same directory is a UserError naming the holder."""
    f = (run_dir / ".lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{run_dir}: another training ({holder}) is writing to this run "
                        "directory; wait for it to end or choose another training.run_name"
                        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


class RunLog:
    """logging.jsonl (one JSON object per event), plus the backends in `report_to`: TensorBoard
    (`kind/name` scalars in tb/) and Weights & Biases (the logging.jsonl names, in
    RUN_DIR/wandb/; WANDB_MODE=offline works without a network). Main process only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None,
                 report_to: tuple[str, ...] = ("tensorboard",)):
        self.enabled = enabled
        self.path = run_dir / "logging.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        if "wandb" in report_to:
            self.wandb = start_wandb(run_dir)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows the resumed run will write again (and a half-written last
        line), atomically: a kill during the rewrite leaves the whole old log."""
        if not self.path.exists():
            return
        lines = read_text(self.path).split("\n")
        keep = []
        for number, line in enumerate(lines, 1):
            if not line.strip() or (number == len(lines) and not _is_json(line)):
                continue  # blank, or a row a kill cut short
            row = parse_json(line, f"{self.path}:{number}")
            if not (isinstance(row, dict) and type(row.get("step")) is int):
                raise UserError(f"{self.path}:{number}: a log row needs an integer 'step'")
            if row["step"] <= step:
                keep.append(line)
        write_text_atomic(self.path, "".join(x + "\n" for x in keep))

    def log(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, int | float) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"{kind}/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run_dir: Path):
    """A W&B run named after the run directory, holding its resolved config and metadata."""
    try:
        import wandb
    except ImportError:
        raise UserError("training.report_to lists wandb, which is not installed: "
                        "pip install 'coordexp[wandb]'") from None
    config = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    metadata = json.loads((run_dir / "run_metadata.json").read_text())
    try:
        return wandb.init(dir=run_dir, project=os.environ.get("WANDB_PROJECT", "coordexp"),
                          name=run_dir.name, config=config | {"run_metadata": metadata},
                          settings=wandb.Settings(console="off"))
    except wandb.errors.UsageError as e:
        raise UserError(f"wandb could not start a run ({e}); run `wandb login`, or set "
                        "WANDB_MODE=offline to log locally and `wandb sync` later") from None


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def is_failure(sample: dict) -> bool:
    s = sample["stats"]
    return bool(s["parse_invalid_rollout"] or s["parse_dropped_invalid"] or
                s["parse_dropped_ambiguous"] or s["parse_truncated"] or not s["valid_pred_objects"])


def write_monitor_dump(run_dir: Path, step: int, metrics: dict, samples: list[dict],
                       max_samples: int) -> Path:
    """A few eval samples, failures first, then the rest in eval order."""
    chosen = [s for s in samples if is_failure(s)][:max_samples]
    chosen += [s for s in samples if not is_failure(s)][: max_samples - len(chosen)]
    out = run_dir / "monitor_dumps" / f"step_{step:06d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"global_step": step, "metrics": metrics, "samples": chosen},
                              indent=1))
    tmp.replace(out)
    return out


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def finish_checkpoint(tmp: Path, final: Path) -> None:
    """Move a fully written checkpoint into place; a kill before this leaves only *.tmp."""
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)


def prune_checkpoints(run_dir: Path, keep: int, protect: set[Path]) -> None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_??????"))
    for old in ckpts[:-keep] if keep > 0 else []:
        if old not in protect:
            shutil.rmtree(old)
    for stale in (run_dir / "checkpoints").glob("*.tmp"):
        shutil.rmtree(stale)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder, None if the run has none yet."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_??????"))
    return ckpts[-1] if ckpts else None
