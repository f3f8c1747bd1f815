"""`coordexp infer`: records or a folder of images -> predictions JSONL, through `Detector`.

Each process appends finished lines to its own `PRED.jsonl.partN` (one write per line, a header
line first naming the inputs and settings); at the end the first process merges them into
PRED.jsonl in input order (written to a temporary file and renamed) and removes the parts. A
killed run therefore keeps every line it wrote, and `--resume` redoes only the batches with a
missing line, with the same batch composition, so the result is byte-identical. Under torchrun
the batches of the one plan are dealt round-robin to the processes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from coordexp.config import RolloutConfig
from coordexp.data.records import Record, read_records
from coordexp.detector import (
    MAX_NEW_TOKENS,
    Detector,
    image_size,
    plan_batches,
    resolve_device,
    rollout_config,
)
from coordexp.errors import UserError
from coordexp.files import check_output_file, read_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class InferOptions:
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    batch_size: int = 8
    max_new_tokens: int = MAX_NEW_TOKENS
    repetition_penalty: float = 1.0
    constrained: bool = False
    field_order: str = "desc_first"
    resume: bool = False


def infer_command(model: str | Path, out_path: str | Path, *, data: str | None = None,
                  images: str | None = None, opts: InferOptions = InferOptions()) -> int:
    """`coordexp infer`; under torchrun every process runs it on its share of the batches."""
    rollout = rollout_config(opts.batch_size, opts.max_new_tokens, opts.repetition_penalty,
                             opts.constrained)
    out = check_output_file(out_path, "--out")  # before any work, not after the rollouts
    records = read_records(data) if data is not None else image_records(images)
    if not records:
        raise UserError(f"{data}: no records")
    if part_paths(out) and not opts.resume:
        raise UserError(f"{part_paths(out)[0]}: an interrupted run's predictions are here; "
                        "pass --resume to continue it, or delete the .part files to start again")
    rank, world, device = start_processes(resolve_device(opts.device))
    detector = Detector.load(model, device=str(device), dtype=opts.dtype,
                             attn_implementation=opts.attn_implementation,
                             field_order=opts.field_order)
    header = run_header(model, records, opts, detector)
    done = read_parts(out, header)
    synchronize()
    plan = plan_batches(records, opts.batch_size)
    todo = [b for j, b in enumerate(plan) if j % world == rank and not done.keys() >= set(b)]
    with open_part(out, rank, header) as part:
        write_predictions(detector, records, todo, rollout, done, part, progress=rank == 0)
    synchronize()
    if rank == 0:
        entries = merge_parts(out, header, len(records))
        print(summary_line(entries, out, opts.max_new_tokens))
    synchronize()
    return 0


def write_predictions(detector: Detector, records: list[Record], batches: list[list[int]],
                      rollout: RolloutConfig, done: dict[int, dict], part, *,
                      progress: bool) -> None:
    """Run the batches, appending each line not yet written; fsync once per batch."""
    try:
        for batch, found in detector.stream(records, batches, rollout, progress=progress):
            for i, d in zip(batch, found, strict=True):
                if i not in done:
                    entry = {"index": i, "line": d.prediction.to_line(),
                             "hit_max_new_tokens": d.hit_max_new_tokens}
                    append_line(part, json.dumps(entry, ensure_ascii=False))
            os.fsync(part.fileno())
    except UserError as e:  # e.g. an image that cannot be read
        raise UserError(f"{e}; the predictions written so far are kept in {part.name}: "
                        "rerun with --resume to continue") from None


# -- inputs -----------------------------------------------------------------------------------
def image_records(spec: str) -> list[Record]:
    """--images DIR (its image files, sorted) or GLOB (`**` recurses); paths are written
    relative to DIR, or to the glob's folder before its first wildcard, so a records JSONL in
    that folder names them the same way; sizes come from the files."""
    spec_path = Path(spec)
    if spec_path.is_dir():
        root, paths = spec_path, [p for p in spec_path.iterdir()
                                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        where = f"{spec} (looked for {' '.join(IMAGE_SUFFIXES)})"
    elif glob.has_magic(spec):
        root = Path(*[part for part in _until_magic(spec_path.parts)] or ["."])
        paths = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        where = f"glob {spec!r}"
    else:
        raise UserError(f"--images {spec}: neither a folder nor a glob pattern")
    if not paths:
        raise UserError(f"--images: no image files in {where}")
    records = []
    for p in sorted(paths):
        rel = p.relative_to(root).as_posix()
        records.append(Record(rel, *image_size(p), (), root))
    return records


def _until_magic(parts: tuple[str, ...]) -> list[str]:
    out = []
    for part in parts:
        if glob.has_magic(part):
            break
        out.append(part)
    return out


# -- processes --------------------------------------------------------------------------------
def start_processes(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); under torchrun, the process group (nccl on
    GPUs, gloo on the CPU) and one GPU per process (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def synchronize() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- resumable output -------------------------------------------------------------------------
def run_header(model: str | Path, records: list[Record], opts: InferOptions,
               detector: Detector) -> dict:
    """What a part file's lines depend on: the inputs, the model and every setting that can
    change a prediction (a resumed run must match it)."""
    inputs = json.dumps([(r.image, r.width, r.height) for r in records])
    return {"coordexp_infer_part": 1,
            "inputs_sha256": hashlib.sha256(inputs.encode()).hexdigest(),
            "inputs": len(records), "model": str(Path(model).resolve()),
            "device": detector.model.device.type, "dtype": str(detector.model.dtype),
            "attn_implementation": opts.attn_implementation, "batch_size": opts.batch_size,
            "max_new_tokens": opts.max_new_tokens,
            "repetition_penalty": opts.repetition_penalty, "constrained": opts.constrained,
            "field_order": opts.field_order}


def part_paths(out: Path) -> list[Path]:
    return sorted(out.parent.glob(glob.escape(out.name) + ".part*"))


def read_parts(out: Path, header: dict) -> dict[int, dict]:
    """Entries already written by earlier runs: input index -> {"line", "hit_max_new_tokens"}."""
    done: dict[int, dict] = {}
    for path in part_paths(out):
        done |= read_part(path, header)
    return done


def read_part(path: Path, header: dict) -> dict[int, dict]:
    """A part file's complete lines; a last line cut by a kill (no newline) is ignored."""
    text = read_text(path)
    lines = text.split("\n")[:-1]  # the piece after the last newline is unfinished
    if not lines:
        return {}
    try:
        found = json.loads(lines[0])
        entries = [json.loads(s) for s in lines[1:]]
    except ValueError as e:
        raise UserError(f"{path}: not a coordexp infer part file ({e}); delete it") from None
    if found != header:
        diff = sorted(k for k in header.keys() | found.keys() if header.get(k) != found.get(k))
        raise UserError(f"{path}: written by a run with other inputs or settings "
                        f"({', '.join(diff)} differ); rerun with those, or delete the .part "
                        "files to start again")
    return {e["index"]: e for e in entries}


def open_part(out: Path, rank: int, header: dict):
    """This process's part file for appending, its header written and any cut line dropped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(f"{out.name}.part{rank}")
    if path.exists():
        with path.open("r+b") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    part = open(path, "ab", buffering=0)  # noqa: SIM115 (the caller closes it)
    if part.tell() == 0:
        append_line(part, json.dumps(header))
    return part


def append_line(part, text: str) -> None:
    """One line in one write, so a kill leaves whole lines and at most one cut last line."""
    data = (text + "\n").encode("utf-8")
    assert os.write(part.fileno(), data) == len(data)


def merge_parts(out: Path, header: dict, count: int) -> list[dict]:
    """All parts -> PRED.jsonl in input order (atomically), then the parts are removed;
    returns the entries in input order."""
    parts = part_paths(out)
    done = read_parts(out, header)
    missing = [i for i in range(count) if i not in done]
    assert not missing, f"no prediction for inputs {missing[:10]}"
    entries = [done[i] for i in range(count)]
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e["line"], ensure_ascii=False) + "\n")
    tmp.replace(out)
    for path in parts:
        path.unlink()
    return entries


def summary_line(entries: list[dict], out: Path, max_new_tokens: int) -> str:
    lines = [e["line"] for e in entries]

    def total(key: str) -> int:
        return sum(line[key] for line in lines)

    text = (f"wrote {len(lines)} predictions ({sum(len(ln['objects']) for ln in lines)} "
            f"objects) to {out}; invalid rollouts {total('parse_invalid_rollout')}, "
            f"truncated {total('parse_truncated')}, "
            f"dropped objects {total('parse_dropped_invalid')}")
    cut = sum(e["hit_max_new_tokens"] for e in entries)
    if cut:
        text += (f"\n{cut} answers reached --max-new-tokens {max_new_tokens} and were cut: "
                 "their complete objects are kept (a cut inside the objects array counts as "
                 "parse_truncated); raise --max-new-tokens if the images are crowded")
    return text
