"""`coordexp study`: arms from one checkpoint, equal budgets, resume after a kill, and the
table's statistics against a hand computation."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from coordexp import study
from coordexp.cli import main

RECIPE = Path(study.__file__).parent / "configs" / "demo"


def test_paired_differences_and_intervals_equal_a_hand_computation():
    control = [0.5, 0.6, 0.7]
    arm = [0.6, 0.6, 0.9]  # paired differences 0.1, 0.0, 0.2
    results = [{"arm": name, "seed": seed, "rollout/AP50": v}
               for name, values in (("c", control), ("x", arm))
               for seed, v in zip((1, 2, 3), values, strict=True)]
    rows = {(r["metric"], r["arm"]): r for r in study.summarize(results, ["c", "x"], "c")}
    x, c = rows["AP50", "x"], rows["AP50", "c"]
    assert x["n"] == 3 and x["mean"] == pytest.approx(2.1 / 3)
    # sample sd of (0.6, 0.6, 0.9): mean 0.7, squares 0.01 + 0.01 + 0.04 over n - 1 = 2
    assert x["sd"] == pytest.approx(math.sqrt(0.06 / 2))
    assert c["sd"] == pytest.approx(0.1)
    assert x["diff"] == pytest.approx(0.1)
    # A resample of three paired differences repeats the smallest (largest) one with chance
    # 1/27 = 3.7 % > 2.5 %, so the 95 % percentile interval is exactly [min, max].
    assert (x["low"], x["high"]) == pytest.approx((0.0, 0.2))
    assert math.isnan(c["diff"]) and math.isnan(c["low"])  # the control against itself
    assert math.isnan(rows["mAP", "x"]["mean"])  # a metric no run logged is n/a, not 0
    for r in results:
        r |= {"step": 10, "train_minutes": 0.5}
    table = study.format_study_table(list(rows.values()), results, ["c", "x"], "c")
    assert "| AP50 | x | 3 | 0.700 | 0.173 | +0.100 | [+0.000, +0.200] |" in table
    assert "| AP50 | c | 3 | 0.600 | 0.100 | n/a | n/a |" in table
    assert "| mAP | x | 3 | n/a | n/a | n/a | n/a |" in table
    assert "| x | 3 | 10 | 0.50 |" in table


def test_paired_difference_edge_cases_and_the_normal_approximation():
    assert study.paired_difference([0.3, 0.3], [0.1, 0.1]) == pytest.approx((0.2, 0.2, 0.2))
    mean, low, high = study.paired_difference([0.4], [0.1])  # one pair: no interval
    assert mean == pytest.approx(0.3) and math.isnan(low) and math.isnan(high)
    # many pairs: the interval is the bootstrap's, and the seeded result is reproducible
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.5, 0.1, 40), rng.normal(0.45, 0.1, 40)
    mean, low, high = study.paired_difference(a, b)
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))  # normal approximation, same data
    assert mean == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.01)
    assert high == pytest.approx(d.mean() + half, abs=0.01)
    assert study.paired_difference(a, b) == (mean, low, high)


def write_spec(tmp_path: Path, synth_dir: Path, **extra) -> Path:
    spec = {"output_dir": str(tmp_path / "study"),
            "data": {"train": str(synth_dir / "train.jsonl"), "val": str(synth_dir / "val.jsonl")},
            "start": {"config": str(RECIPE / "stage1.yaml"),
                      "overrides": ["training.max_steps=2", "training.eval_steps=9",
                                    "training.eval_at_end=false", "training.save_steps=2",
                                    "training.per_device_batch_size=2",
                                    "training.effective_batch_size=2"]},
            "budget": {"steps": 2}, "seeds": [1, 2], "control": "control",
            "arms": {"control": {"config": str(RECIPE / "stage1_continued.yaml"),
                                 "overrides": ["training.per_device_batch_size=2",
                                               "training.effective_batch_size=2",
                                               "data.val_limit=2", "rollout.max_new_tokens=24"]},
                     "a_n1": {"config": str(RECIPE / "stage2_ab.yaml"),
                              "overrides": ["stage2_ab.schedule.b_ratio=0.0",
                                            "stage2_ab.n_softctx_iter=1",
                                            "training.per_device_batch_size=2",
                                            "training.effective_batch_size=2",
                                            "data.val_limit=2", "rollout.max_new_tokens=24"]}}}
    spec |= extra
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # arms in this order
    return path


@pytest.mark.slow
def test_study_arms_share_one_start_equal_budgets_and_resume_skips_finished(
        tmp_path, synth_dir, monkeypatch, capsys):
    from coordexp.train import loop

    real_train, calls = loop.train, []

    def killed_on_third_arm(cfg, **kw):
        calls.append(cfg)
        run_dir = real_train(cfg, **kw)
        if len(calls) == 4:  # start, two finished arms, then a kill before the result
            raise KeyboardInterrupt
        return run_dir

    monkeypatch.setattr(loop, "train", killed_on_third_arm)
    spec = write_spec(tmp_path, synth_dir)
    assert main(["study", str(spec)]) == 130
    root = tmp_path / "study"
    done = {p.parent.relative_to(root).as_posix(): p.read_text()
            for p in root.glob("*/seed*/result.json")}
    assert sorted(done) == ["a_n1/seed1", "control/seed1"]
    assert (root / "control" / "seed2" / "logging.jsonl").is_file()  # killed, unfinished

    calls.clear()
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: calls.append(cfg) or real_train(cfg, **kw))
    assert main(["study", str(spec)]) == 0
    # the resumed study reran the killed arm and the one never started, nothing else
    assert [(c.training.output_dir, c.training.run_name) for c in calls] == [
        (str(root / "control"), "seed2"), (str(root / "a_n1"), "seed2")]
    for name, text in done.items():
        assert (root / name / "result.json").read_text() == text

    start = json.loads((root / "start" / "result.json").read_text())["checkpoint"]
    for arm in ("control", "a_n1"):
        for seed in (1, 2):
            run = root / arm / f"seed{seed}"
            cfg = yaml.safe_load((run / "resolved_config.yaml").read_text())
            assert cfg["model"]["path"] == start and cfg["training"]["seed"] == seed
            assert (cfg["training"]["max_steps"], cfg["training"]["max_minutes"]) == (2, 0.0)
            assert json.loads((run / "result.json").read_text())["step"] == 2
    out = capsys.readouterr().out
    table = (root / "study_table.md").read_text()
    assert "| AP50 | a_n1 | 2 |" in table and "| near_dup | control | 2 |" in table
    assert table in out
    rows = json.loads((root / "study.json").read_text())["table"]
    assert {(r["metric"], r["arm"]) for r in rows} == {
        (label, arm) for label, _ in study.METRICS for arm in ("control", "a_n1")}
    assert (root / "compare" / "report.html").is_file()


def test_spec_errors_name_the_key(tmp_path, synth_dir, capsys):
    bad = {"arms": {"control": {"config": "x.yaml", "overrides": ["training.seed=3"]}}}
    assert main(["study", str(write_spec(tmp_path, synth_dir, **bad))]) == 2
    assert "which the study sets itself" in capsys.readouterr().err
    assert main(["study", str(write_spec(tmp_path, synth_dir, control="nope"))]) == 2
    assert "'control' (nope) must name an arm" in capsys.readouterr().err
    assert main(["study", str(write_spec(tmp_path, synth_dir, budget={"hours": 1}))]) == 2
    assert "'budget' must be" in capsys.readouterr().err
    assert main(["study", str(write_spec(tmp_path, synth_dir, extra_key=1))]) == 2
    assert "unknown keys ['extra_key']" in capsys.readouterr().err
    start_arm = {"arms": {"start": {"config": "x.yaml"}}, "control": "start"}
    assert main(["study", str(write_spec(tmp_path, synth_dir, **start_arm))]) == 2
    assert "arm name 'start' must be" in capsys.readouterr().err
    # a time budget with a warm-up or decaying schedule: refused before anything trains
    warm = {"arms": {"control": {"config": str(RECIPE / "stage1.yaml")}}}
    spec = write_spec(tmp_path, synth_dir, budget={"minutes": 1}, **warm)
    assert main(["study", str(spec)]) == 2
    assert "arm 'control': a minutes budget needs a constant learning rate" in \
        capsys.readouterr().err
    assert not (tmp_path / "study" / "start").exists()


def test_a_study_folder_keeps_its_spec(tmp_path, synth_dir, capsys):
    spec = write_spec(tmp_path, synth_dir)
    study.pin_spec(spec, study.load_spec(spec))
    other = write_spec(tmp_path, synth_dir, seeds=[7])
    assert main(["study", str(other)]) == 2
    assert "holds a study with another spec" in capsys.readouterr().err
