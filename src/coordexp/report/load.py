"""Read a run directory (DESIGN.md section 6) for the report: metadata, resolved config,
logging.jsonl rows and monitor dumps. A running or killed run is fine: what is absent is listed
in `Run.missing`, and a half-written last line of logging.jsonl is skipped and noted."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from coordexp.config import read_yaml
from coordexp.errors import UserError
from coordexp.files import read_text

RUN_FILES = ("run_metadata.json", "resolved_config.yaml", "logging.jsonl")
DUMP_RE = re.compile(r"step_(\d+)\.json")
SAMPLE_KEYS = ("sample_id", "width", "height", "gt_objects", "pred_objects", "match")


@dataclass
class Run:
    """Everything the report reads from one run directory."""

    path: Path
    metadata: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    dumps: list[dict] = field(default_factory=list)  # sorted by global_step
    missing: list[str] = field(default_factory=list)  # what the report could not show, and why


def load_run(path: str | Path) -> Run:
    """Read a run directory; UserError if it is not one (none of RUN_FILES, no monitor_dumps/)."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not any((run_dir / name).is_file() for name in RUN_FILES) and not list_dumps(run_dir):
        raise UserError(f"{run_dir}: not a run directory (none of {', '.join(RUN_FILES)} or "
                        "monitor_dumps/step_*.json); pass the folder `coordexp train` wrote")
    run = Run(path=run_dir)
    run.metadata = _read_json_file(run_dir / "run_metadata.json", run)
    run.config = _read_config(run_dir / "resolved_config.yaml", run)
    rows = read_log_rows(run_dir / "logging.jsonl", run)
    run.train_rows = [r for r in rows if r["kind"] == "train"]
    run.eval_rows = [r for r in rows if r["kind"] == "eval"]
    run.dumps = [_read_dump(p) for p in list_dumps(run_dir)]
    _note_empty(run)
    return run


def _note_empty(run: Run) -> None:
    if (run.path / "logging.jsonl").is_file() and not run.train_rows:
        run.missing.append("no train rows in logging.jsonl: no diagnostics or correlations")
    if (run.path / "logging.jsonl").is_file() and not run.eval_rows:
        run.missing.append("no eval rows in logging.jsonl (no evaluation yet): no eval table")
    if not run.dumps:
        run.missing.append("no monitor dumps (monitor_dumps/step_*.json): no rollout samples, "
                           "failure patterns or overlays")


def _read_json_file(path: Path, run: Run) -> dict:
    if not path.is_file():
        run.missing.append(f"{path.name} is missing: no provenance")
        return {}
    try:
        data = json.loads(read_text(path))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return data


def _read_config(path: Path, run: Run) -> dict:
    if not path.is_file():
        run.missing.append(f"{path.name} is missing: no knob summary")
        return {}
    return read_yaml(path)


def read_log_rows(path: Path, run: Run) -> list[dict]:
    """logging.jsonl rows; a broken last line is a write in progress (skipped, noted), a broken
    line before it is corruption (UserError naming the line)."""
    if not path.is_file():
        run.missing.append("logging.jsonl is missing: no eval table, diagnostics or correlations")
        return []
    lines = read_text(path).splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if number == len(lines):
                run.missing.append(f"logging.jsonl line {number} is half-written (skipped)")
                break
            raise UserError(f"{path}:{number}: not valid JSON ({e})") from None
        rows.append(_check_row(row, path, number))
    return rows


def _check_row(row, path: Path, number: int) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "kind" not in row:
        raise UserError(f"{path}:{number}: a log row needs an integer 'step' and a 'kind'")
    return row


def list_dumps(run_dir: Path) -> list[Path]:
    """monitor_dumps/step_XXXXXX.json files in step order (in-progress *.tmp files excluded)."""
    folder = run_dir / "monitor_dumps"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if DUMP_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(DUMP_RE.fullmatch(p.name).group(1)))


def _read_dump(path: Path) -> dict:
    try:
        dump = json.loads(read_text(path))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(dump, dict) or not isinstance(dump.get("samples"), list):
        raise UserError(f"{path}: a monitor dump needs a 'samples' list")
    for i, sample in enumerate(dump["samples"]):
        absent = [k for k in SAMPLE_KEYS if k not in sample]
        if absent:
            raise UserError(f"{path}: sample {i} lacks {', '.join(absent)}")
    dump.setdefault("global_step", int(DUMP_RE.fullmatch(path.name).group(1)))
    dump["path"] = str(path)
    return dump


def resolve_image(run_dir: Path, image: str) -> Path:
    """A dump's image path: absolute (what training writes), or relative to the run directory,
    or else to the working directory."""
    p = Path(image)
    if p.is_absolute() or (p.is_file() and not (run_dir / p).is_file()):
        return p
    return run_dir / p
