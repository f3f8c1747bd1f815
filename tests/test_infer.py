"""`coordexp infer` and `Detector`: images == records, kill + --resume == uninterrupted,
torchrun == one process, Python == CLI, device/dtype, and bad input (exit 2, nothing lost)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from coordexp import Detector, detector, infer
from coordexp.cli import main
from coordexp.data.collate import load_image
from coordexp.data.records import Record, read_records
from coordexp.model.qwen_vl import build_processor, save_vlm
from coordexp.model.tiny import TinySpec, build_tiny_model

SIZES = [(112, 112), (140, 84), (84, 140), (112, 56), (96, 96), (56, 112)]
EXIF_SIZE = (120, 80)  # stored pixels; the EXIF tag says "rotate 90": shown as 80x120
# constrained greedy decoding on this seed's random weights writes objects until the budget
SETTINGS = ["--batch-size", "3", "--max-new-tokens", "48", "--constrained"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Subprocesses run with OMP_NUM_THREADS=1; the in-process runs use one thread too, so
    every run does the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("model") / "tiny"
    model = build_tiny_model(tiny_tokenizer, TinySpec(family="qwen2_5_vl"), seed=3)
    save_vlm(model, build_processor("qwen2_5_vl", tiny_tokenizer), out)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Images of different sizes (so the batch plan reorders them), one a JPEG with an EXIF
    orientation tag, and `records.jsonl` naming the same files."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    pixels = rng.integers(0, 256, (EXIF_SIZE[1], EXIF_SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "phone.jpg", exif=exif)
    names = sorted(p.name for p in root.iterdir())
    with (root / "records.jsonl").open("w") as f:
        for name in names:
            w, h = Image.open(root / name).size
            f.write(json.dumps({"images": [name], "width": w, "height": h, "objects": []}) + "\n")
    return root


@pytest.fixture(scope="module")
def reference(model_dir, photos, tmp_path_factory):
    """One uninterrupted one-process run on the records: (file bytes, printed summary)."""
    out = tmp_path_factory.mktemp("ref") / "pred.jsonl"
    args = ["infer", "--model", str(model_dir), "--data", str(photos / "records.jsonl"),
            "--out", str(out), *SETTINGS]
    assert main(args) == 0
    return out.read_bytes()


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(s) for s in data.decode().splitlines()]


def error_line(err: str) -> str:
    """The one error line (stderr also carries the progress bars of loading and inference)."""
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def infer_args(model_dir, out, *extra) -> list[str]:
    return ["infer", "--model", str(model_dir), "--out", str(out), *SETTINGS, *extra]


def test_reference_run_has_objects_and_reports_truncated_answers(reference, photos, capsys,
                                                                 model_dir, tmp_path):
    lines = lines_of(reference)
    names = [r.image for r in read_records(photos / "records.jsonl")]
    assert [ln["images"][0] for ln in lines] == names  # input order, not the batch plan's
    assert len(names) == len(SIZES) + 1
    assert sum(len(ln["objects"]) for ln in lines) > 0  # a test of something, not of []
    first_scores = {ln["objects"][0]["score"] for ln in lines if ln["objects"]}
    assert len(first_scores) == len(lines)  # each image its own line: a mix-up would show
    truncated = sum(ln["parse_truncated"] for ln in lines)
    assert truncated > 0  # the 48-token budget cuts these answers: counted per line...
    assert main(infer_args(model_dir, tmp_path / "p.jsonl", "--data",
                           str(photos / "records.jsonl"))) == 0
    printed = capsys.readouterr().out
    assert f"truncated {truncated}" in printed  # ...and told, with the budget hits:
    assert f"{len(lines)} answers reached --max-new-tokens 48" in printed
    assert main(["eval", "--gt", str(photos / "records.jsonl"), "--pred",
                 str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "ev")]) == 0  # eval reads it


def test_images_folder_equals_records_jsonl(reference, model_dir, photos, tmp_path):
    out = tmp_path / "pred.jsonl"
    assert main(infer_args(model_dir, out, "--images", str(photos))) == 0
    assert out.read_bytes() == reference
    phone = next(ln for ln in lines_of(reference) if ln["images"] == ["phone.jpg"])
    assert (phone["width"], phone["height"]) == EXIF_SIZE  # pixels as stored, as training reads


def test_image_sizes_follow_the_training_reader(photos):
    """--images reads sizes the way load_image (training) sees the pixels, EXIF tag included."""
    for r in infer.image_records(str(photos)):
        assert load_image(r).size == (r.width, r.height)
    assert [r.image for r in infer.image_records(str(photos / "*.png"))] == [
        f"{i}.png" for i in range(len(SIZES))]


def test_glob_paths_are_relative_to_the_folder_before_the_wildcard(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.PNG", "a/b/z.txt"):
        Image.new("RGB", (8, 6)).save(tmp_path / name, format="PNG")
    found = infer.image_records(str(tmp_path / "a" / "**" / "*.[pP][nN][gG]"))
    assert [(r.image, r.root, r.width, r.height) for r in found] == [
        ("b/y.PNG", tmp_path / "a", 8, 6), ("x.png", tmp_path / "a", 8, 6)]


def test_batch_plan_groups_similar_areas_and_covers_every_input_once():
    records = [Record(str(i), w, h, ()) for i, (w, h) in enumerate([(10, 10), (30, 30), (10, 10),
                                                                    (20, 20), (30, 30)])]
    assert detector.plan_batches(records, 2) == [[1, 4], [3, 0], [2]]
    assert detector.plan_batches(records[:0], 2) == []


KILLER = """
import os, signal, sys
from coordexp import infer
from coordexp.cli import main
real, calls = infer.append_line, [0]
def dying(part, text):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_LINE"]):
        data = (text + "\\n").encode()
        os.write(part.fileno(), data[: len(data) // 2])  # a line cut in the middle
        os.kill(os.getpid(), signal.SIGKILL)
    real(part, text)
infer.append_line = dying
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumed_is_byte_identical(reference, model_dir, photos, tmp_path):
    """Killed while writing the 5th prediction line (2nd batch of 3: its first line is in),
    resumed: the same bytes as one uninterrupted run."""
    kill_at = 6  # part lines: 1 header, then predictions
    out = tmp_path / "pred.jsonl"
    args = infer_args(model_dir, out, "--data", str(photos / "records.jsonl"))
    done = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True,
                          env={**ENV, "KILL_AT_LINE": str(kill_at)})
    assert done.returncode == -signal.SIGKILL
    part = tmp_path / "pred.jsonl.part0"
    written = part.read_bytes()
    assert not out.exists() and written.count(b"\n") == kill_at - 1
    assert not written.endswith(b"\n")  # the cut line is there, to be dropped on resume
    assert main(args) == 2  # no --resume: the written lines are kept, not overwritten
    assert part.read_bytes() == written
    assert main([*args, "--resume"]) == 0
    assert out.read_bytes() == reference
    assert not list(tmp_path.glob("*.part*"))


def test_resume_refuses_other_settings(model_dir, photos, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    args = infer_args(model_dir, out, "--data", str(photos / "records.jsonl"))
    part = tmp_path / "pred.jsonl.part0"
    header = infer.run_header(model_dir, read_records(photos / "records.jsonl"),
                              infer.InferOptions(batch_size=3, max_new_tokens=48,
                                                 constrained=True),
                              Detector.load(model_dir))
    part.write_text(json.dumps(header | {"max_new_tokens": 99}) + "\n")
    assert main([*args, "--resume"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "max_new_tokens differ" in err and str(part) in err


def test_torchrun_two_processes_equal_one_process(reference, model_dir, photos, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "pred.jsonl"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "coordexp",
                           *infer_args(model_dir, out, "--data", str(photos / "records.jsonl"))],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == reference
    assert done.stdout.count("wrote 7 predictions") == 1  # one merged file, one summary


def test_detector_predict_equals_infer(reference, model_dir, photos):
    det = Detector.load(model_dir, device="cpu")
    names = [ln["images"][0] for ln in lines_of(reference)]
    got = det.predict([photos / n for n in names], batch_size=3, max_new_tokens=48,
                      constrained=True)
    for ln, d in zip(lines_of(reference), got, strict=True):
        assert d.labels == [o["desc"] for o in ln["objects"]]
        assert d.boxes.tolist() == [o["bbox_2d"] for o in ln["objects"]]
        assert d.scores.tolist() == [o["score"] for o in ln["objects"]]
        assert d.prediction.to_line() | {"images": ln["images"]} == ln
        assert d.hit_max_new_tokens  # this model writes objects until the 48-token budget
    in_memory = det.predict([Image.open(photos / n) for n in names], batch_size=3,
                            max_new_tokens=48, constrained=True)
    assert [d.boxes.tolist() for d in in_memory] == [d.boxes.tolist() for d in got]
    assert [d.scores.tolist() for d in in_memory] == [d.scores.tolist() for d in got]


def test_field_order_reaches_the_grammar_and_parser(model_dir, photos, tmp_path, monkeypatch):
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return generate(*args)

    generate = detector.generate_batch
    monkeypatch.setattr(detector, "generate_batch", spy)
    out = tmp_path / "pred.jsonl"
    assert main(infer_args(model_dir, out, "--images", str(photos / "*.jpg"),
                           "--field-order", "geometry_first")) == 0
    assert seen == ["geometry_first"]
    objects = [o for ln in lines_of(out.read_bytes()) for o in ln["objects"]]
    raw = lines_of(out.read_bytes())[0]["raw_text"]
    assert objects and raw.index('"bbox_2d"') < raw.index('"desc"')


def test_load_casts_and_places_the_model_once(model_dir):
    det = Detector.load(model_dir, device="cpu", dtype="bf16")
    assert {p.dtype for p in det.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in det.model.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in det.model.parameters()) and not det.model.training
    assert det.model.config._attn_implementation == "sdpa"
    assert detector.resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize(("best", "chosen"), [(200, 200), (None, 300), (50, 300)])
def test_a_run_directory_loads_its_best_kept_checkpoint(tmp_path, best, chosen):
    """best_step from the last trainer state when that checkpoint was kept, else the latest."""
    run = tmp_path / "run"
    for step in (100, 300, 200):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text("{}")
        (ckpt / "trainer_state.json").write_text(json.dumps({"best_step": best}))
    assert detector.model_dir(run) == run / "checkpoints" / f"step_{chosen:06d}"
    assert detector.model_dir(ckpt) == ckpt
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # an adapter checkpoint is a model too
    assert detector.model_dir(adapter) == adapter


def corrupt_model(model_dir, tmp_path):
    bad = tmp_path / "bad_model"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return bad


@pytest.mark.parametrize(("case", "message"), [
    ("missing image", "not found"),
    ("unreadable image", "cannot read image"),
    ("empty folder", "no image files"),
    ("corrupt checkpoint", "cannot load the model"),
    ("not a model", "not a model directory"),
    ("batch size 0", "--batch-size"),
    ("no GPU", "--device cuda"),
    ("bad device", "--device must be"),
    ("repetition penalty", "--repetition-penalty"),
    ("flash attention", "--attn flash_attention_2"),
    ("bad dtype", "--dtype"),
])
def test_bad_input_exits_2_with_one_line(model_dir, photos, tmp_path, capsys, case, message):
    if case == "no GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    folder = tmp_path / "imgs"
    shutil.copytree(photos, folder)
    model, source, extra = model_dir, ["--images", str(folder)], []
    if case == "missing image":
        (folder / "3.png").unlink()
        source = ["--data", str(folder / "records.jsonl")]
    elif case == "unreadable image":
        (folder / "3.png").write_bytes(b"not a png")
    elif case == "empty folder":
        source = ["--images", str(tmp_path)]
    elif case == "corrupt checkpoint":
        model = corrupt_model(model_dir, tmp_path)
    elif case == "not a model":
        model = folder
    else:
        extra = {"batch size 0": ["--batch-size", "0"], "no GPU": ["--device", "cuda"],
                 "bad device": ["--device", "tpu"], "repetition penalty":
                 ["--repetition-penalty", "0"], "flash attention": ["--attn",
                 "flash_attention_2"], "bad dtype": ["--dtype", "fp8"]}[case]
    try:
        code = main([*infer_args(model, tmp_path / "p.jsonl", *extra), *source])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    assert message in error_line(capsys.readouterr().err)
    assert not (tmp_path / "p.jsonl").exists()


def test_an_image_failing_mid_run_keeps_the_written_lines(reference, model_dir, photos,
                                                         tmp_path, capsys):
    """The smallest image is read in the last batch: cut it, the run stops with exit 2 naming
    it, the lines already written stay; repaired, --resume finishes the same file."""
    folder = tmp_path / "imgs"
    shutil.copytree(photos, folder)
    smallest = folder / "5.png"  # 56x112 ties 112x56 (3.png) at the smallest area: last
    smallest.write_bytes(smallest.read_bytes()[:200])
    out = tmp_path / "pred.jsonl"
    args = infer_args(model_dir, out, "--data", str(folder / "records.jsonl"))
    assert main(args) == 2
    err = error_line(capsys.readouterr().err)
    assert str(smallest) in err and "--resume" in err
    kept = (tmp_path / "pred.jsonl.part0").read_text().splitlines()
    assert len(kept) == 1 + 6  # header + the two full batches
    shutil.copy(photos / "5.png", smallest)
    assert main([*args, "--resume"]) == 0
    assert out.read_bytes() == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_runs_in_bf16_and_agrees_with_fp32_cpu(model_dir, photos):
    paths = sorted(photos.glob("*.png"))
    gpu = Detector.load(model_dir, device="cuda")
    assert {p.device.type for p in gpu.model.parameters()} == {"cuda"}
    assert {p.dtype for p in gpu.model.parameters()} == {torch.bfloat16}
    cpu = Detector.load(model_dir, device="cpu", dtype="fp32")
    opts = dict(batch_size=3, max_new_tokens=48, constrained=True)
    for g, c in zip(gpu.predict(paths, **opts), cpu.predict(paths, **opts), strict=True):
        assert g.labels == c.labels and g.boxes.tolist() == c.boxes.tolist()
        np.testing.assert_allclose(g.scores, c.scores, atol=0.05)


def test_package_exports_detector():
    import coordexp

    assert coordexp.Detector is detector.Detector
