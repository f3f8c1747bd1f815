"""model.path as a hub id: resolved through the local Hugging Face cache (HF_HOME), never
downloaded, with a one-line error when the model is not there."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordexp.cli import main

SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(hf_home, repo, model_dir):
    """The hub cache layout: hub/models--owner--name/{refs/main, snapshots/<sha>/...}."""
    entry = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, entry / "snapshots" / SHA)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SHA)
    return entry / "snapshots" / SHA


def run_python(code, hf_home):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_a_cached_hub_id_loads_from_its_snapshot(tmp_path, tiny_dir):
    snapshot = fake_cache(tmp_path / "hf", "someorg/tiny-vl", tiny_dir / "qwen3_vl")
    code = ("from coordexp.detector import model_dir\n"
            "from coordexp.model.qwen_vl import load_vlm, resolve_model_dir\n"
            "print(resolve_model_dir('someorg/tiny-vl'))\n"
            "print(model_dir('someorg/tiny-vl'))\n"
            "model, processor, family = load_vlm('someorg/tiny-vl')\n"
            "print(family, len(processor.tokenizer))")
    done = run_python(code, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    path, for_infer, loaded = done.stdout.strip().splitlines()[-3:]
    assert path == for_infer == str(snapshot.resolve())
    assert loaded.startswith("qwen3_vl ")


@pytest.mark.parametrize("name", ["nobody/not-cached-vl", "../missing", "runs/run--1"])
def test_an_uncached_hub_id_or_missing_path_is_one_clear_error(tmp_path, capsys, name):
    code = main(["model", "add-coord-tokens", "--src", name, "--dst", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{name}: no such directory, and no such model in the local" in err


def test_a_directory_wins_over_a_hub_id_of_the_same_name(tmp_path, tiny_dir, monkeypatch):
    from coordexp.model.qwen_vl import resolve_model_dir

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir / "qwen2_5_vl", tmp_path / "org" / "model")
    assert resolve_model_dir("org/model") == Path("org/model")
