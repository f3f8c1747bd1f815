"""Shared fixtures: an offline tiny tokenizer, tiny models and a small synthetic dataset."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from coordexp.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """Saved tiny VLM directories, one per family."""
    from coordexp.model.qwen_vl import build_processor, save_vlm
    from coordexp.model.tiny import FAMILIES, TinySpec, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    for family in FAMILIES:
        model = build_tiny_model(tiny_tokenizer, TinySpec(family=family))
        save_vlm(model, build_processor(family, tiny_tokenizer), root / family)
    return root


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from coordexp.data.synthetic import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 16, 8, seed=0, spec=SynthSpec(image_size=112, max_objects=6))
    return out


@pytest.fixture()
def torchrun_train(tmp_path):
    """Run `coordexp train` in 2 processes (torchrun, gloo on CPU); returns the run directory."""
    import os
    import socket
    import subprocess
    import sys

    def run(overrides: list[str], output_dir) -> object:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg_file = tmp_path / "empty.yaml"
        cfg_file.write_text("{}\n")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", "-m", "coordexp", "train", str(cfg_file),
                        *overrides, f"training.output_dir={output_dir}"], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        return output_dir / "run"

    return run
