"""training.report_to: a Weights & Biases run (offline, no network) holds the same scalars as
logging.jsonl, plus the run's config and metadata; the key is a strict list."""

import json
import math
import struct
from pathlib import Path

import pytest

from coordexp.config import load_config
from coordexp.errors import UserError
from coordexp.train.loop import train


def wandb_records(path: Path):
    """The protobuf records of an offline run file (.wandb: a LevelDB-style log of 32 KiB
    blocks after a 7-byte header; each chunk has crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_offline_run(run_dir: Path) -> tuple[dict[int, dict], dict]:
    """History rows by step (our keys only) and the run's config."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
            step = row.pop("_step")
            history.setdefault(step, {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")})
        elif kind in ("run", "config"):
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config |= {_key(u): json.loads(u.value_json) for u in updates}
    return history, config


def _key(item) -> str:
    """A name with '/' (`loss/token_ce`) is stored as a one-element nested key."""
    return item.key or "/".join(item.nested_key)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logging_jsonl_scalars(synth_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [
        "model.init_tiny=qwen2_5_vl", "training.max_steps=2", "training.effective_batch_size=2",
        "training.per_device_batch_size=2", "training.eval_steps=2", "data.val_limit=2",
        "rollout.max_new_tokens=16", f"data.train={synth_dir / 'train.jsonl'}",
        f"data.val={synth_dir / 'val.jsonl'}", f"training.output_dir={tmp_path}",
        "training.report_to=[wandb]"])
    run_dir = train(cfg)
    rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"train", "eval"}
    want: dict[int, dict] = {}
    for r in rows:
        want.setdefault(r["step"], {}).update(
            {k: v for k, v in r.items() if k not in ("step", "kind")
             and isinstance(v, int | float) and math.isfinite(v)})
    history, config = read_offline_run(run_dir)
    assert history == want
    assert "loss/token_ce" in history[1] and "rollout/mAP" in history[2]
    assert config["training"]["report_to"] == ["wandb"]
    assert config["run_metadata"]["seed"] == cfg.training.seed
    assert not (run_dir / "tb").exists()  # TensorBoard only when listed


@pytest.mark.parametrize(("value", "message"), [
    ("wandb", "must be a list"), ("[tensorboard,mlflow]", "at most once"),
    ("[wandb,wandb]", "at most once"), ("[1]", r"report_to\[0\]' must be str")])
def test_report_to_is_a_strict_list(value, message, synth_dir):
    with pytest.raises(UserError, match=message):
        load_config(None, ["model.init_tiny=qwen2_5_vl", f"data.train={synth_dir}/train.jsonl",
                           f"training.report_to={value}"])


def test_report_to_round_trips_through_the_resolved_config(tmp_path, synth_dir):
    import yaml

    from coordexp.config import config_to_dict

    cfg = load_config(None, ["model.init_tiny=qwen2_5_vl", f"data.train={synth_dir}/train.jsonl",
                             "training.report_to=[]"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(tmp_path / "c.yaml") == cfg and cfg.training.report_to == ()
