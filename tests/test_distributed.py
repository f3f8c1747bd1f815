"""Two processes (torchrun, gloo on CPU) against one: torch DDP and FSDP2 give the one-process
losses and weights for Stage 1 and the fast Channel A, full and LoRA; a killed FSDP run resumes
onto the same trajectory; distributed evaluation gives the one-process metrics exactly.

All two-process jobs run in one torchrun launch (plus one for the resume), since starting the
processes costs more than the tiny runs themselves."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordexp.config import load_config
from coordexp.data.records import read_records
from coordexp.model.qwen_vl import load_vlm
from coordexp.train.evaluation import evaluate_model
from coordexp.train.loop import train

pytestmark = pytest.mark.slow

BASE = ["model.init_tiny=qwen2_5_vl", "model.lora.r=4", "training.max_steps=3",
        "training.save_steps=3", "training.effective_batch_size=4",
        "training.per_device_batch_size=2", "training.learning_rate=3e-3",
        "training.warmup_ratio=0"]
# Channel A with soft context embeddings: `st` feeds the argmax bin forward, so a 1e-7 weight
# difference after step 1 may flip a near-tie and move the run by far more than the engines do
ARMS = {"stage1": [], "channel_a": ["training.stage=stage2_ab", "stage2_ab.n_softctx_iter=2",
                                    "stage2_ab.channel_a_impl=fast",
                                    "stage2_ab.coord_ctx_embed_mode=soft"]}
TUNINGS = {"full": [], "lora": ["model.tuning=lora"]}
CASES = [(e, a, t) for e in ("ddp", "fsdp") for a in ARMS for t in TUNINGS]
RESUME = BASE + ["training.distributed=fsdp", "training.max_steps=6"]
# the grammar makes an early model's rollouts parse into objects, so the metrics are not zeros
EVAL = ["rollout.batch_size=3", "rollout.max_new_tokens=48", "rollout.constrained=true"]


def torchrun(jobs: list[dict], tmp: Path) -> None:
    jobs_file = tmp / f"jobs_{len(list(tmp.glob('jobs_*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("distributed_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={port}", str(worker), str(jobs_file)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def overrides(case, synth_dir, out: Path) -> list[str]:
    engine, arm, tuning = case
    return BASE + ARMS[arm] + TUNINGS[tuning] + [
        f"data.train={synth_dir / 'train.jsonl'}", f"training.distributed={engine}",
        f"training.output_dir={out}"]


@pytest.fixture(scope="module")
def two(synth_dir, tmp_path_factory):
    """Every two-process run: the parity cases, a 6-step FSDP run killed after its step-3
    checkpoint and resumed, and the FSDP engine's distributed evaluation of its last model."""
    tmp = tmp_path_factory.mktemp("two")
    data = [f"data.train={synth_dir / 'train.jsonl'}"]
    resume_ov = RESUME + data + [f"training.output_dir={tmp / 'full_run'}"]
    model_dir = tmp / "full_run" / "run" / "checkpoints" / "step_000006"
    eval_ov = data + EVAL + [f"data.val={synth_dir / 'val.jsonl'}", "model.path=x"]
    jobs = [{"train": overrides(c, synth_dir, tmp / "_".join(c))} for c in CASES]
    jobs += [{"train": resume_ov},
             {"eval": str(model_dir), "overrides": eval_ov, "out": str(tmp / "eval.json")}]
    torchrun(jobs, tmp)
    killed = tmp / "killed" / "run"
    shutil.copytree(tmp / "full_run" / "run", killed)
    shutil.rmtree(killed / "checkpoints" / "step_000006")
    with (killed / "logging.jsonl").open("a") as f:
        f.write('{"step": 4, "kind": "tr')  # killed mid-write too
    resumed = RESUME + data + [f"training.output_dir={tmp / 'killed'}"]
    torchrun([{"train": resumed, "resume": "latest"}], tmp)
    return tmp


@pytest.fixture()
def one_thread():
    """The workers' thread count: a matmul splits its sums by thread, so the references must
    too, or their last bits differ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one(synth_dir, tmp_path_factory):
    """One-process runs of each (arm, tuning), made on first use (under one_thread)."""
    tmp, runs = tmp_path_factory.mktemp("one"), {}

    def run(arm: str, tuning: str) -> Path:
        if (arm, tuning) not in runs:
            runs[arm, tuning] = train(load_config(None, overrides(
                ("ddp", arm, tuning), synth_dir, tmp / f"{arm}_{tuning}")))
        return runs[arm, tuning]

    return run


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "logging.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    name = "adapter_model.safetensors" if (ckpt / "adapter_config.json").exists() else \
        "model.safetensors"
    return load_file(ckpt / name)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_two_processes_match_one_in_losses_and_weights(two, one, one_thread, case):
    engine, arm, tuning = case
    multi, single = two / "_".join(case) / "run", one(arm, tuning)
    multi_rows, single_rows = rows(multi), rows(single)
    assert len(multi_rows) == len(single_rows) == 3
    for a, b in zip(multi_rows, single_rows, strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "loss/token_ce", "loss/coord_soft_ce"):
            assert abs(a[key] - b[key]) <= 1e-5, key
        # FSDP sums the (float64) squares shard by shard: the norm's last bits may differ
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-12)
        assert a["coord_diag/coord_tokens"] == b["coord_diag/coord_tokens"]
    got, want = weights(multi, 3), weights(single, 3)
    assert got.keys() == want.keys()
    for key, w in want.items():
        assert float((got[key] - w).abs().max()) <= 1e-5, key


def test_weights_moved_in_three_steps(one, one_thread):
    """The parity above compares trained weights, not initial ones."""
    init = load_file(one("stage1", "full") / "init_model" / "model.safetensors")
    trained = weights(one("stage1", "full"), 3)
    moved = sum(float((trained[k] - init[k]).abs().max()) > 1e-4 for k in trained)
    assert moved > len(trained) // 2


def test_killed_fsdp_run_resumes_onto_the_same_trajectory(two):
    full, resumed = rows(two / "full_run" / "run"), rows(two / "killed" / "run")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]
    got, want = weights(two / "killed" / "run", 6), weights(two / "full_run" / "run", 6)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=0, atol=0)


def test_distributed_eval_equals_one_process_exactly(two, synth_dir, one_thread):
    model_dir = two / "full_run" / "run" / "checkpoints" / "step_000006"
    model, processor, _ = load_vlm(model_dir)
    cfg = load_config(None, [f"data.train={synth_dir / 'train.jsonl'}", "model.path=x"] + EVAL)
    want, want_samples = evaluate_model(model, processor, read_records(synth_dir / "val.jsonl"),
                                        cfg)
    got = json.loads((two / "eval.json").read_text())
    assert got["metrics"] == want  # AP, F1, counts: exactly
    assert got["samples"] == json.loads(json.dumps(want_samples))  # every rollout and score
    assert want["rollout/pred_objects"] > 0 and want["rollout/gt_objects_total"] > 0


def test_no_hand_written_gradient_all_reduce_is_left():
    """Gradients are reduced by DDP / FSDP only: the one all_reduce left sums statistics."""
    src = Path(__file__).parents[1] / "src" / "coordexp"
    calls = [(p.name, line.strip()) for p in src.rglob("*.py")
             for line in p.read_text().splitlines() if "all_reduce(" in line]
    assert calls == [("loop.py", "dist.all_reduce(stacked)")]
