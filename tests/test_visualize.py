"""`coordexp visualize`: boxes drawn where they are, GT dashed, the gallery worst F1 first, every
image it names present, and (where Chromium is installed) every image loading in a browser."""

import html
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageColor

from coordexp.cli import main
from coordexp.visualize import GT_COLOUR, MIN_SIDE, label_colour

SIZE = 128  # enlarged x4 to MIN_SIDE
SCALE = MIN_SIDE // SIZE


@pytest.fixture()
def dataset(tmp_path):
    """Three black images: 'good' predicted exactly (F1 1), 'half' with one of two objects
    found (F1 2/3), 'none' with no prediction line at all (F1 0)."""
    boxes = {"good": [[10, 20, 60, 90]], "half": [[10, 10, 50, 50], [70, 70, 120, 110]],
             "none": [[30, 30, 90, 90]]}
    gt, pred = [], []
    for name, objs in boxes.items():
        Image.new("RGB", (SIZE, SIZE)).save(tmp_path / f"{name}.png")
        gt.append({"images": [f"{name}.png"], "width": SIZE, "height": SIZE,
                   "objects": [{"desc": "square", "bbox_2d": b} for b in objs]})
        if name != "none":
            pred.append({"images": [f"{name}.png"], "width": SIZE, "height": SIZE,
                         "objects": [{"desc": "square", "score": 0.9, "bbox_2d": objs[0]}]})
    for file, rows in (("gt.jsonl", gt), ("pred.jsonl", pred)):
        (tmp_path / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def gallery_images(out: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', (out / "index.html").read_text())


def test_gallery_is_sorted_worst_f1_first_and_every_image_exists(dataset, capsys):
    out = dataset / "vis"
    assert main(["visualize", "--pred", str(dataset / "pred.jsonl"), "--gt",
                 str(dataset / "gt.jsonl"), "--out", str(out)]) == 0
    files = gallery_images(out)
    assert [Path(f).stem.split("_", 1)[1] for f in files] == ["none", "half", "good"]
    page = (out / "index.html").read_text()
    assert [float(v) for v in re.findall(r"F1 ([0-9.]+)", page)] == pytest.approx([0, 2 / 3, 1],
                                                                                    abs=1e-3)
    for f in files:
        assert Image.open(out / f).size == (MIN_SIDE, MIN_SIDE)
    assert "drew 3 images" in capsys.readouterr().out


def test_boxes_are_drawn_on_their_edges_and_gt_is_dashed(dataset):
    out = dataset / "vis"
    assert main(["visualize", "--pred", str(dataset / "pred.jsonl"), "--gt",
                 str(dataset / "gt.jsonl"), "--out", str(out)]) == 0
    half = np.asarray(Image.open(next((out / "images").glob("*_half.png"))))
    pred_rgb = ImageColor.getrgb(label_colour("square"))
    x1, y1, x2, y2 = (v * SCALE for v in (10, 10, 50, 50))
    assert tuple(half[(y1 + y2) // 2, x1 + 1]) == pred_rgb  # left edge of the predicted box
    assert tuple(half[(y1 + y2) // 2, (x1 + x2) // 2]) == (0, 0, 0)  # inside: untouched
    # the missed GT box (70, 70, 120, 110): its top edge alternates green and background
    row = half[70 * SCALE, 70 * SCALE:120 * SCALE]
    green = (row == ImageColor.getrgb(GT_COLOUR)).all(1)
    assert 0.3 < green.mean() < 0.7 and (~green).any()


def test_min_score_hides_lower_scored_boxes(dataset):
    out = dataset / "vis"
    assert main(["visualize", "--pred", str(dataset / "pred.jsonl"), "--out", str(out),
                 "--min-score", "0.95"]) == 0
    good = np.asarray(Image.open(next((out / "images").glob("*_good.png"))))
    assert (good == 0).all()  # the 0.9 box is not drawn, and there is no GT to draw


def test_without_gt_keeps_input_order_and_finds_images_beside_the_predictions(dataset):
    out = dataset / "vis"
    assert main(["visualize", "--pred", str(dataset / "pred.jsonl"), "--out", str(out)]) == 0
    assert [Path(f).stem.split("_", 1)[1] for f in gallery_images(out)] == ["good", "half"]
    assert "F1" not in (out / "index.html").read_text()


def test_a_missing_image_exits_2_naming_it(dataset, capsys):
    (dataset / "half.png").unlink()
    assert main(["visualize", "--pred", str(dataset / "pred.jsonl"), "--out",
                 str(dataset / "vis")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(dataset / "half.png") in err and "--image-root" in err
    assert len(err.splitlines()) == 1


CHROMIUM = Path("/usr/bin/chromium")
# Loaded into a copy of the page: records failed loads, then what the page shows; --dump-dom
# prints the body attribute after the load event.
PROBE = """<script>
const broken = [];
window.addEventListener('error', e => broken.push(e.target && e.target.src ?
  'load:' + e.target.getAttribute('src') : 'js:' + e.message), true);
window.addEventListener('load', () => {
  for (const img of document.images)
    if (!(img.complete && img.naturalWidth > 0)) broken.push('img:' + img.getAttribute('src'));
  document.body.setAttribute('data-probe', JSON.stringify({images: document.images.length,
    broken: broken}));
});
</script>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
def test_gallery_opens_in_headless_chromium_with_every_image_loading(dataset, tmp_path):
    out = dataset / "vis"
    assert main(["visualize", "--pred", str(dataset / "pred.jsonl"), "--gt",
                 str(dataset / "gt.jsonl"), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", f'<head><base href="{out.resolve().as_uri()}/">'
                                  + PROBE, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
             "--dump-dom"]
    done = subprocess.run([str(CHROMIUM), *flags, probe.as_uri()], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', done.stdout).group(1)))
    assert found == {"images": 3, "broken": []}
