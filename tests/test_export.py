"""`coordexp export coco-results`: pycocotools on the exported results gives `coordexp eval`'s
AP; boxes, ids and scores are carried exactly; unmatched labels are counted and listed."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coordexp.cli import main
from coordexp.data.coco import coco_to_records
from coordexp.data.records import write_records

SIZES = [(100, 80), (64, 64), (120, 90), (50, 70), (90, 60)]
CATEGORIES = ["cat", "dog", "traffic light", "zebra"]  # zebra: no GT box anywhere
STATS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def gt_box(rng, w: int, h: int, edge: bool) -> list[float]:
    """xywh; with `edge` it touches the right and bottom borders exactly."""
    bw, bh = rng.uniform(0.2, 0.6) * w, rng.uniform(0.2, 0.6) * h
    x, y = (w - bw, h - bh) if edge else (rng.uniform(0, w - bw), rng.uniform(0, h - bh))
    return [float(x), float(y), float(bw), float(bh)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """COCO instances (ids deliberately not 1..N), images, the same GT as records, and
    predictions: jittered GT boxes, exact copies on the border, false positives, a wrongly
    cased label, a label that is no category, and a box for the GT-less category."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    images, anns, preds = [], [], []
    for i, (w, h) in enumerate(SIZES):
        name = f"{i:012d}.jpg"
        Image.new("RGB", (w, h)).save(root / "images" / name)
        images.append({"id": 100 + 7 * i, "file_name": name, "width": w, "height": h})
        objects = []
        for k in range(rng.integers(2, 6)):
            box = gt_box(rng, w, h, edge=k == 0)
            cat = int(rng.integers(0, 3))
            anns.append({"id": len(anns) + 1, "image_id": 100 + 7 * i, "category_id": 10 + cat,
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
            x, y, bw, bh = box
            x1y1x2y2 = [x, y, x + bw, y + bh] if k == 0 else list(np.clip(
                np.array([x, y, x + bw, y + bh]) + rng.normal(0, 4, 4), 0, [w, h, w, h]))
            objects.append({"desc": CATEGORIES[cat], "score": float(rng.uniform(0.1, 1)),
                            "bbox_2d": [float(v) for v in x1y1x2y2]})
        fp = gt_box(rng, w, h, edge=True)
        extra = [("dog", fp), ("Traffic_Light", gt_box(rng, w, h, False)),
                 ("unicorn", gt_box(rng, w, h, False)), ("zebra", gt_box(rng, w, h, False))]
        for desc, (x, y, bw, bh) in extra[: 1 + i % 4]:
            objects.append({"desc": desc, "score": float(rng.uniform(0.1, 1)),
                            "bbox_2d": [x, y, x + bw, y + bh]})
        preds.append({"images": [f"images/{name}"], "width": w, "height": h, "objects": objects})
    instances = {"images": images, "annotations": anns,
                 "categories": [{"id": 10 + k, "name": c} for k, c in enumerate(CATEGORIES)]}
    (root / "instances.json").write_text(json.dumps(instances))
    records, skipped = coco_to_records(instances, root / "images", root)
    assert not skipped
    write_records(root / "gt.jsonl", records)
    with (root / "pred.jsonl").open("w") as f:
        for p in preds:
            f.write(json.dumps(p) + "\n")
    return root, preds


def pycocotools_stats(instances, results) -> dict[str, float]:
    gt = COCO(str(instances))
    ev = COCOeval(gt, gt.loadRes(str(results)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return dict(zip(STATS, ev.stats[: len(STATS)], strict=False))


def test_pycocotools_ap_of_exported_results_equals_coordexp_eval(dataset, tmp_path, capsys):
    root, _ = dataset
    results = tmp_path / "results.json"
    assert main(["export", "coco-results", "--pred", str(root / "pred.jsonl"),
                 "--gt", str(root / "instances.json"), "--out", str(results)]) == 0
    assert main(["eval", "--gt", str(root / "gt.jsonl"), "--pred", str(root / "pred.jsonl"),
                 "--out", str(tmp_path / "ev"), "--semantic", "off"]) == 0
    ours = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    theirs = pycocotools_stats(root / "instances.json", results)
    assert 0.2 < theirs["mAP"] < 0.95  # neither trivial nor perfect
    for key in STATS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key


def test_results_carry_boxes_ids_and_scores_and_list_unmatched_labels(dataset, tmp_path,
                                                                      capsys):
    root, preds = dataset
    results = tmp_path / "results.json"
    assert main(["export", "coco-results", "--pred", str(root / "pred.jsonl"),
                 "--gt", str(root / "instances.json"), "--out", str(results)]) == 0
    printed = capsys.readouterr().out
    entries = json.loads(results.read_text())
    expected, unicorns = [], 0
    for i, p in enumerate(preds):
        for o in p["objects"]:
            if o["desc"] == "unicorn":
                unicorns += 1
                continue
            x1, y1, x2, y2 = o["bbox_2d"]
            cat = {"cat": 10, "dog": 11, "traffic light": 12, "Traffic_Light": 12, "zebra": 13}
            expected.append({"image_id": 100 + 7 * i, "category_id": cat[o["desc"]],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": o["score"]})
    assert entries == expected and unicorns > 0
    assert f"left out {unicorns} boxes whose label is no category: 'unicorn' ({unicorns})" \
        in printed


@pytest.mark.parametrize(("change", "message"), [
    ("unknown image", "no image named 'other.jpg'"),
    ("twice", "already has predictions"),
    ("no score", "'score'"),
])
def test_bad_predictions_exit_2_naming_the_line(dataset, tmp_path, capsys, change, message):
    root, preds = dataset
    lines = [dict(p) for p in preds]
    if change == "unknown image":
        lines[2] = lines[2] | {"images": ["x/other.jpg"]}
    elif change == "twice":
        lines.append(lines[0])
    else:
        lines[2] = lines[2] | {"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}]}
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(p) + "\n" for p in lines))
    out = tmp_path / "results.json"
    assert main(["export", "coco-results", "--pred", str(pred), "--gt",
                 str(root / "instances.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    line = 6 if change == "twice" else 3
    assert message in err and f"{pred}:{line}" in err and len(err.splitlines()) == 1
    assert not out.exists()
