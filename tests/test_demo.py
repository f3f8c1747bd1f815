"""`coordexp demo`, shrunk: every stage runs, the eval table prints, the run artifacts exist."""

import json
from pathlib import Path

import pytest
import yaml

from coordexp import demo
from coordexp.cli import main


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "N_TRAIN", 48)
    monkeypatch.setattr(demo, "N_VAL", 6)
    monkeypatch.setattr(demo, "N_SELECT", 5)
    evals = record_eval_images(monkeypatch)
    monkeypatch.chdir(tmp_path)  # a relative --out, as a user types it
    assert main(["demo", "--out", "demo_run", "--minutes", "0.15"]) == 0
    out, err = capsys.readouterr()
    assert "[demo] task:" in out and "AP50" in out
    assert "stage2_ab - stage1_continued after equal training time" in out
    assert "unreadable" not in out + err  # the report finds the dumped images
    root = tmp_path / "demo_run"
    table = out.split("[demo] stage1/sel rows")[0]
    assert {line.split("|")[0].strip() for line in table.splitlines() if "|" in line} == {
        "stage", "stage1/sel", "start", "stage2_ab", "stage1_continued"}
    for run in ("stage1", "stage2_ab", "stage1_continued"):
        run_dir = root / run
        for name in ("run_metadata.json", "resolved_config.yaml", "logging.jsonl"):
            assert (run_dir / name).is_file(), (run, name)
        rows = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
        assert any(r["kind"] == "eval" and "rollout/AP50" in r for r in rows)
        assert any((run_dir / "monitor_dumps").glob("step_*.json"))
        assert (run_dir / "report" / "report.html").is_file()
        dump = json.loads(sorted((run_dir / "monitor_dumps").glob("step_*.json"))[-1].read_text())
        assert all(Path(s["image"]).is_absolute() and Path(s["image"]).is_file()
                   for s in dump["samples"])
    # the control and Stage 2 start from the one checkpoint Stage 1 chose, for equal time
    resolved = {run: yaml.safe_load((root / run / "resolved_config.yaml").read_text())
                for run in ("stage2_ab", "stage1_continued")}
    starts = {run: (c["model"]["path"], c["training"]["max_minutes"])
              for run, c in resolved.items()}
    assert len(set(starts.values())) == 1
    assert Path(starts["stage2_ab"][0]).resolve() == demo.best_checkpoint(root / "stage1").resolve()
    assert resolved["stage1_continued"]["training"]["learning_rate"] == \
        resolved["stage2_ab"]["training"]["learning_rate"]
    assert main(["demo", "--out", "demo_run", "--minutes", "0.15"]) == 2  # no overwrite
    assert_selection_never_reads_reported(root, evals)


def record_eval_images(monkeypatch) -> list[tuple[str, list[Path]]]:
    """Every evaluation's (run name, image paths), in call order."""
    from coordexp.train import evaluation

    calls, real = [], evaluation.score_predictions  # every evaluation scores through it

    def spy(records, preds, cfg):
        calls.append((cfg.training.run_name, [r.image_path.resolve() for r in records]))
        return real(records, preds, cfg)

    monkeypatch.setattr(evaluation, "score_predictions", spy)
    return calls


def assert_selection_never_reads_reported(root: Path, evals: list) -> None:
    """Stage 1's evals (which pick the start checkpoint) read only the selection split; that
    split shares no image and no scene with the reported one; the reported split is read only
    after the choice (the start row, then the two runs from it)."""
    from coordexp.data.records import read_records

    reported = read_records(root / "data" / "val.jsonl")
    selection = read_records(root / "selection" / "val.jsonl")
    reported_images = {r.image_path.resolve() for r in reported}
    selection_images = {r.image_path.resolve() for r in selection}
    assert not reported_images & selection_images
    assert not {r.objects for r in reported} & {r.objects for r in selection}
    names = [name for name, _ in evals]
    first_reported = next(i for i, (_, images) in enumerate(evals)
                          if set(images) == reported_images)
    assert set(names[:first_reported]) == {"stage1"} and "stage1" in names
    for _, images in evals[:first_reported]:
        assert set(images) == selection_images
    assert all(set(images) == reported_images for _, images in evals[first_reported:])


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
    common = ['data.train="demo_run/data/train.jsonl"', 'training.output_dir="runs/demo"']
    reported = common + ['data.val="demo_run/data/val.jsonl"']
    stage1 = load_config(root / "stage1.yaml")
    selection = common + ['data.val="demo_run/selection/val.jsonl"']
    assert stage1 == load_config(demo.RECIPE / "stage1.yaml", selection)
    ckpt = ["model.path=runs/demo/stage1/checkpoints/step_006000"]
    for name in ("stage2_ab", "stage1_continued"):
        from_file = load_config(root / f"{name}.yaml", ckpt)
        packaged = load_config(demo.RECIPE / f"{name}.yaml", reported + ckpt)
        assert from_file == replace(packaged, training=replace(packaged.training, max_minutes=2.0))
    stage2 = load_config(root / "stage2_ab.yaml", ckpt)
    control = load_config(root / "stage1_continued.yaml", ckpt)
    assert (stage1.training.stage, stage2.training.stage) == ("stage1", "stage2_ab")
    assert stage2.stage2_ab.schedule.b_ratio == 0.5 and stage2.model.init_tiny == ""
    # the control differs from Stage 2 in its objective only, not in rate or schedule
    assert control.training.stage == "stage1" and control.model.init_tiny == ""
    assert control.training.learning_rate == stage2.training.learning_rate
    assert control.training.min_lr_ratio == stage2.training.min_lr_ratio == 1.0
