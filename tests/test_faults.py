"""Faults a run must survive without losing data: a kill during the resume-time log rewrite,
two trainings into one run directory, a run killed before its first checkpoint; and inputs that
used to be silently wrong: special-token text in a desc, 16-bit PNGs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import coordexp
from coordexp.artifacts import RunLog, lock_run_dir
from coordexp.cli import main
from coordexp.data.collate import Collator, load_image
from coordexp.data.records import read_records
from coordexp.errors import UserError

SRC = str(Path(coordexp.__file__).parents[1])
ROWS = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 11)]


def write_log(run_dir: Path) -> bytes:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in ROWS) + '{"step": 11, "kind": "tr'
    (run_dir / "logging.jsonl").write_text(text)
    return text.encode()


KILL_AT = """
import os, signal, sys
from pathlib import Path
import coordexp.files as files
from coordexp.artifacts import RunLog
point = sys.argv[2]
real = getattr(files.os, point)
def kill(*args):
    if point == "replace":  # the new log is complete on disk, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args)
    os.kill(os.getpid(), signal.SIGKILL)  # fsync: written and flushed, not renamed
setattr(files.os, point, kill)
RunLog(Path(sys.argv[1]), enabled=False)._truncate_after(6)
"""


@pytest.mark.parametrize("point", ["fsync", "replace"])
def test_kill_during_resume_log_rewrite_keeps_every_row(tmp_path, point):
    before = write_log(tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(tmp_path), point],
                          env={"PYTHONPATH": SRC}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # killed at that very point
    assert (tmp_path / "logging.jsonl").read_bytes() == before  # every row still there
    # the next resume truncates to the checkpoint's step, and the leftover temp file is reused
    RunLog(tmp_path, enabled=False)._truncate_after(6)
    kept = [json.loads(x) for x in (tmp_path / "logging.jsonl").read_text().splitlines()]
    assert kept == ROWS[:6]


def test_interrupted_log_rewrite_leaves_the_log_whole(tmp_path, monkeypatch):
    import coordexp.files as files

    before = write_log(tmp_path)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RunLog(tmp_path, enabled=False)._truncate_after(3)
    assert (tmp_path / "logging.jsonl").read_bytes() == before


def test_a_corrupt_log_row_before_the_last_is_an_error_naming_the_line(tmp_path):
    write_log(tmp_path)
    lines = (tmp_path / "logging.jsonl").read_text().split("\n")
    lines[3] = lines[3][:10]
    (tmp_path / "logging.jsonl").write_text("\n".join(lines))
    with pytest.raises(UserError, match=r"logging.jsonl:4: malformed JSON"):
        RunLog(tmp_path, enabled=False)._truncate_after(6)


# -- 16-bit images ----------------------------------------------------------------------------
def test_16_bit_png_is_scaled_to_8_bit_the_same_way_everywhere(tmp_path):
    from coordexp.detector import image_inputs
    from coordexp.report.plots import _load_image
    from coordexp.visualize import open_image

    grey8 = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 0..65535
    Image.fromarray(grey8, "L").save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    line = {"width": 16, "height": 16, "objects": []}
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line | {"images": [n]}) + "\n"
                                              for n in ("g16.png", "g8.png")))
    r16, r8 = read_records(tmp_path / "r.jsonl")
    training = np.asarray(load_image(r16))  # what training and inference feed the processor
    assert training.dtype == np.uint8 and training.shape == (16, 16, 3)
    np.testing.assert_array_equal(training, np.repeat(grey8[..., None], 3, axis=2))
    np.testing.assert_array_equal(training, np.asarray(load_image(r8)))
    overlay, found = _load_image(tmp_path / "g16.png", 16, 16)  # what the report draws on
    assert found
    np.testing.assert_array_equal(overlay, training)
    drawn = open_image(tmp_path / "g16.png", r16)  # what coordexp visualize draws on
    np.testing.assert_array_equal(np.asarray(drawn), training)
    _, in_memory = image_inputs([Image.open(tmp_path / "g16.png")])  # Detector.predict(PIL)
    np.testing.assert_array_equal(np.asarray(in_memory[0]), training)
    # Pillow's own convert("RGB") clips: nearly white; the test above would catch that
    assert np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")).mean() > 250


# -- special-token text in a desc -------------------------------------------------------------
@pytest.mark.parametrize(("desc", "token"), [("cat <|coord_5|>", "<|coord_5|>"),
                                             ("cat<|im_end|>dog", "<|im_end|>"),
                                             ("<|vision_start|>", "<|vision_start|>")])
def test_desc_with_special_token_text_is_rejected_naming_file_line_and_token(
        tmp_path, tiny_tokenizer, desc, token):
    from coordexp.model.qwen_vl import build_processor

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    ok = {"images": ["a.png"], "width": 16, "height": 16,
          "objects": [{"desc": "cat", "bbox_2d": [1, 1, 8, 8]}]}
    bad = ok | {"objects": [ok["objects"][0], {"desc": desc, "bbox_2d": [2, 2, 9, 9]}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    records = read_records(tmp_path / "r.jsonl")
    # the hazard: the desc text becomes the special token itself
    assert tiny_tokenizer.convert_tokens_to_ids(token) in tiny_tokenizer(desc)["input_ids"]
    collator = Collator(build_processor("qwen2_5_vl", tiny_tokenizer))
    collator.check_descs(records[:1])  # a clean record passes
    with pytest.raises(UserError) as info:
        collator.check_descs(records)
    message = str(info.value)
    assert "r.jsonl:2: object 1" in message and repr(token) in message


# -- the run lock and a run without a checkpoint ----------------------------------------------
TRAIN = ["model.init_tiny=qwen2_5_vl", "training.effective_batch_size=2",
         "training.per_device_batch_size=2", "training.save_steps=1000",
         "training.eval_steps=1000"]


def test_two_trainings_into_one_run_directory_the_second_exits_2(tmp_path, synth_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = [str(cfg), *TRAIN, f"data.train={synth_dir / 'train.jsonl'}",
            f"training.output_dir={tmp_path}", "training.max_steps=100000"]
    first = subprocess.Popen([sys.executable, "-m", "coordexp", "train", *args],
                             env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = tmp_path / "run" / ".lock"
    try:
        while not (lock.is_file() and lock.read_text().startswith("pid")):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        code = main(["train", *args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert f"another training (pid {first.pid})" in err and str(tmp_path / "run") in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lock_run_dir(tmp_path / "run").close()  # a killed training leaves no stale lock


def test_resume_latest_without_a_checkpoint_starts_afresh(tmp_path, synth_dir, capsys):
    write_log(tmp_path / "run")  # killed before its first checkpoint
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert main(["train", str(cfg), *TRAIN, f"data.train={synth_dir / 'train.jsonl'}",
                 f"training.output_dir={tmp_path}", "training.max_steps=1",
                 "--resume", "latest"]) == 0
    assert "has no checkpoint yet; starting the run afresh" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run" / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] != ROWS[0]["loss"]
