"""The training loop: tiny Stage-1 runs learn, write their artifacts, resume exactly, and
agree between one process and two (torchrun, gloo)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from coordexp.cli import main
from coordexp.config import TrainingConfig, load_config
from coordexp.train.engine import clip_gradients
from coordexp.train.loop import (
    NonFiniteLoss,
    TrainState,
    _clock_stop_note,
    _expected_last_step,
    run_micro_steps,
    train,
)
from coordexp.train.terms import ignored_keys_notes

BASE = ["model.init_tiny=qwen2_5_vl", "training.max_steps=6", "training.save_steps=3",
        "training.effective_batch_size=4", "training.per_device_batch_size=2",
        "training.learning_rate=3e-3", "training.warmup_ratio=0"]


def rows(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "logging.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def run_6(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, BASE + [f"data.train={synth_dir / 'train.jsonl'}",
                                    f"training.output_dir={out}"])
    return train(cfg)


def test_stage1_loss_falls_params_change_and_artifacts_exist(run_6):
    losses = [r["loss"] for r in rows(run_6)]
    assert len(losses) == 6 and all(map(lambda x: x == x, losses))
    assert losses[-1] < losses[0] - 0.5
    for name in ("run_metadata.json", "resolved_config.yaml", "logging.jsonl"):
        assert (run_6 / name).is_file()
    assert any((run_6 / "tb").iterdir())
    init = (run_6 / "init_model" / "model.safetensors").read_bytes()
    last = (run_6 / "checkpoints" / "step_000006" / "model.safetensors").read_bytes()
    assert init != last
    row = rows(run_6)[0]
    for key in ("loss/token_ce", "loss/coord_soft_ce", "loss/coord_w1", "loss/coord_gate",
                "coord_diag/expected_bin_mae", "grad_norm", "learning_rate"):
        assert key in row


def test_tensorboard_reads_scalars_back(run_6):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_6 / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[0].value == pytest.approx(rows(run_6)[0]["loss"], rel=1e-6)


def test_resume_after_kill_reproduces_the_trajectory_exactly(run_6, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_6, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000006")  # killed after the step-3 save
    with (copy / "logging.jsonl").open("a") as f:
        f.write('{"step": 7, "kind": "tr')  # and mid-write
    cfg = load_config(run_6 / "resolved_config.yaml", [f"training.output_dir={tmp_path}"])
    train(cfg, resume="latest")
    assert [r["loss"] for r in rows(copy)] == [r["loss"] for r in rows(run_6)]


def test_non_finite_loss_stops_naming_step_and_samples(synth_dir):
    from coordexp.data.records import read_records
    from coordexp.train.data_order import DataOrder

    records = read_records(synth_dir / "train.jsonl")

    def engine(batch, step):
        return torch.tensor(float("nan"), requires_grad=True), {}

    class Autocast:
        def autocast(self):
            return torch.autocast("cpu", enabled=False)

    with pytest.raises(NonFiniteLoss, match=r"step 4 \(samples: images/train/"):
        run_micro_steps(engine, DataOrder(len(records), 0, 2), records, 1, 4, Autocast())


CONFIG_ERRORS = {
    "unknown_key": (["training.lr=1"], "training.lr"),
    "wrong_type": (["training.max_steps=many"], "training.max_steps"),
    "bad_choice": (["stage2_ab.coord_ctx_embed_mode=fuzzy"], "stage2_ab.coord_ctx_embed_mode"),
    "impossible_batch": (["training.effective_batch_size=5"], "effective_batch_size"),
    "b_ratio_range": (["stage2_ab.schedule.b_ratio=1.5"], "stage2_ab.schedule.b_ratio"),
    "moved_match_key": (["rollout.iou_gate=0.5"], "moved to 'match.iou_gate'"),
}


@pytest.mark.parametrize("override,key", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_config_errors_exit_2_naming_the_key(tmp_path, capsys, override, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  init_tiny: qwen2_5_vl\ndata:\n  train: x.jsonl\n"
                   "training:\n  per_device_batch_size: 2\n")
    assert main(["train", str(cfg), *override]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_stage1_only_keys_in_a_stage2_config_are_named():
    base = ["model.init_tiny=qwen3_vl", "data.train=x.jsonl"]
    stage2 = base + ["training.stage=stage2_ab"]
    assert ignored_keys_notes(load_config(None, stage2)) == []
    assert ignored_keys_notes(load_config(None, base + ["coord_soft_ce_w1.gate_weight=0"])) == []
    notes = ignored_keys_notes(load_config(None, stage2 + [
        "coord_soft_ce_w1.gate_weight=0", "coord_soft_ce_w1.bbox_ciou_weight=0.5",
        "stage2_ab.bbox_ciou_weight=0.2"]))
    assert notes == [
        "note: 'coord_soft_ce_w1.gate_weight' (0.0) is read by Stage 1 only; this Stage-2 run "
        "reads 'stage2_ab.coord_gate_weight' (0.0)",
        "note: 'coord_soft_ce_w1.bbox_ciou_weight' (0.5) is read by Stage 1 only; this Stage-2 "
        "run reads 'stage2_ab.bbox_ciou_weight' (0.2)"]


def test_yaml_extends_and_float_strings(tmp_path):
    (tmp_path / "base.yaml").write_text("training:\n  learning_rate: 1e-5\n  max_steps: 7\n"
                                        "model:\n  init_tiny: qwen3_vl\n")
    (tmp_path / "leaf.yaml").write_text("extends: base.yaml\ntraining:\n  max_steps: 9\n"
                                        "data:\n  train: t.jsonl\n")
    cfg = load_config(tmp_path / "leaf.yaml", ["training.seed=3",
                                               "training.per_device_batch_size=2"])
    assert cfg.training.learning_rate == 1e-5 and cfg.training.max_steps == 9
    assert cfg.training.seed == 3 and cfg.model.init_tiny == "qwen3_vl"
    assert cfg.gradient_accumulation_steps(world_size=2) == 2  # 8 = 2 x 2 ranks x 2
    assert cfg.gradient_accumulation_steps(world_size=1) == 4



def test_a_clock_stop_early_in_the_schedule_says_so():
    """max_minutes stopping a run inside its warmup (or early in its decay) is named; a run
    that reached max_steps, a late stop, or a constant rate say nothing."""
    t = TrainingConfig(max_steps=1_000_000, warmup_ratio=0.02, max_minutes=12.0)
    note = _clock_stop_note(t, 3934)
    assert "step 3934, inside its 20000-step warmup" in note
    decay = TrainingConfig(max_steps=1000, warmup_ratio=0.0, min_lr_ratio=0.0)
    assert "step 501 of max_steps 1000, 50% of the way" in _clock_stop_note(decay, 501)
    assert _clock_stop_note(decay, 1000) is None
    assert _clock_stop_note(decay, 950) is None
    constant = TrainingConfig(max_steps=100_000, warmup_ratio=0.0, min_lr_ratio=1.0)
    assert _clock_stop_note(constant, 600) is None


def test_time_budget_sets_the_expected_last_step():
    """With max_minutes the progress bar's total is where the budget runs out at the pace so
    far (never past max_steps); without it, max_steps."""
    state = TrainState(step=10, train_seconds=20.0)  # 2 s per step
    assert _expected_last_step(TrainingConfig(max_steps=1000), state) == 1000
    assert _expected_last_step(TrainingConfig(max_steps=1000, max_minutes=1.0), state) == 30
    assert _expected_last_step(TrainingConfig(max_steps=25, max_minutes=1.0), state) == 25
    assert _expected_last_step(TrainingConfig(max_steps=1000, max_minutes=0.1), state) == 10


def test_clipping_uses_the_float64_norm_and_scales_to_max_norm():
    """A float32 norm over many gradients is off by ~1e-5 relative (and differs when summed
    shard by shard), which moved FSDP runs away from one process; the float64 one is exact."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2000, 1000), torch.nn.Linear(1000, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * torch.rand_like(p) ** 4
    want = float(torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm())
    assert clip_gradients(model, 1.0) == pytest.approx(want, rel=1e-13)
    clipped = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-6)
