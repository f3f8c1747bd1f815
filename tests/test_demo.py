"""`coordexp demo`, shrunk: every stage runs, the eval table prints, the run artifacts exist."""

import json
from pathlib import Path

import pytest

from coordexp import demo
from coordexp.cli import main


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "N_TRAIN", 48)
    monkeypatch.setattr(demo, "N_VAL", 6)
    monkeypatch.chdir(tmp_path)  # a relative --out, as a user types it
    assert main(["demo", "--out", "demo_run", "--minutes", "0.15"]) == 0
    out, err = capsys.readouterr()
    assert "[demo] task:" in out and "AP50" in out
    assert "unreadable" not in out + err  # the report finds the dumped images
    for run in ("stage1", "stage2_ab"):
        run_dir = tmp_path / "demo_run" / run
        for name in ("run_metadata.json", "resolved_config.yaml", "logging.jsonl"):
            assert (run_dir / name).is_file(), (run, name)
        rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
        assert any(r["kind"] == "eval" and "rollout/AP50" in r for r in rows)
        assert any((run_dir / "monitor_dumps").glob("step_*.json"))
        assert (run_dir / "report" / "report.html").is_file()
        dump = json.loads(sorted((run_dir / "monitor_dumps").glob("step_*.json"))[-1].read_text())
        assert all(Path(s["image"]).is_absolute() and Path(s["image"]).is_file()
                   for s in dump["samples"])
    assert main(["demo", "--out", "demo_run", "--minutes", "0.15"]) == 2  # no overwrite


def test_demo_refuses_to_overwrite_and_bad_minutes(tmp_path, capsys):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "logging.jsonl").write_text("")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--out", str(tmp_path / "x"), "--minutes", "0"]) == 2
    err = capsys.readouterr().err
    assert "already holds a demo run" in err and "--minutes must be > 0" in err


def test_configs_demo_reproduce_each_demo_stage():
    """configs/demo/*.yaml are the demo's own recipe, plus the demo's data paths."""
    from dataclasses import replace

    from coordexp.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "demo"
    data = ['data.train="demo_run/data/train.jsonl"', 'data.val="demo_run/data/val.jsonl"',
            'training.output_dir="runs/demo"']
    stage1 = load_config(root / "stage1.yaml")
    assert stage1 == load_config(demo.RECIPE / "stage1.yaml", data)
    ckpt = ["model.path=runs/demo/stage1/checkpoints/step_006000"]
    stage2 = load_config(root / "stage2_ab.yaml", ckpt)
    packaged = load_config(demo.RECIPE / "stage2_ab.yaml", data + ckpt)
    assert stage2 == replace(packaged, training=replace(packaged.training, max_minutes=2.5))
    assert (stage1.training.stage, stage2.training.stage) == ("stage1", "stage2_ab")
    assert stage2.stage2_ab.schedule.b_ratio == 0.5 and stage2.model.init_tiny == ""
