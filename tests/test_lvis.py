"""LVIS federated evaluation on hand-built GT and predictions, against hand-computed numbers."""

import json

import pytest

from coordexp.cli import main
from coordexp.data.records import DetObject, Record
from coordexp.errors import UserError
from coordexp.eval import evaluate_detections

A, B, C = (10, 10, 50, 50), (20, 20, 60, 60), (5, 50, 45, 95)


def lvis_record(name, objects, neg=(), not_exhaustive=()):
    return Record(name, 100, 100, tuple(DetObject(d, b) for d, b in objects),
                  extra={"neg_categories": list(neg),
                         "not_exhaustive_categories": list(not_exhaustive)})


def pred(name, *objects):
    return {"images": [name], "objects": [{"desc": d, "bbox_2d": list(b), "score": s}
                                          for d, b, s in objects]}


# Image 1 shows a cat and is verified to hold no dog; image 2 shows a dog and says nothing
# about cats. The cat prediction on image 2 (the highest score) is unverifiable, so ignored;
# the dog prediction on image 1 is a negative category's, so a false positive.
GT = [lvis_record("1.png", [("cat", A)], neg=["dog"]), lvis_record("2.png", [("dog", B)])]
SCORED = [[("cat", A, 0.9), ("dog", (60, 60, 90, 90), 0.8)],
          [("cat", (0, 0, 30, 30), 0.95), ("dog", B, 0.7)]]
PREDS = [pred("1.png", *SCORED[0]), pred("2.png", *SCORED[1])]


def test_unverified_category_is_ignored_and_negative_category_is_a_false_positive():
    ev = evaluate_detections(GT, PREDS, semantic=False)
    m = ev.metrics
    # cat: its only kept detection is a TP -> AP 1; dog: FP (0.8) then TP (0.7) -> the
    # precision envelope is 1/2 at every recall point -> AP 1/2. Mean over 2 categories, at
    # every IoU threshold (the boxes are exact).
    assert m["mAP"] == pytest.approx(0.75) and m["AP50"] == pytest.approx(0.75)
    assert {r["category"]: r["AP"] for r in ev.per_class} == pytest.approx(
        {"cat": 1.0, "dog": 0.5})
    # F1 is class-agnostic and counts every prediction: 2 of 4 matched.
    assert (m["pred_objects"], m["matched"], m["fp_total"], m["fn_total"]) == (4, 2, 2, 0)
    assert ev.counters["lvis_unverified_ignored"] == 1


def test_without_federated_labels_the_same_boxes_score_as_plain_coco():
    plain = [Record(r.image, r.width, r.height, r.objects) for r in GT]
    m = evaluate_detections(plain, PREDS, semantic=False).metrics
    # cat: FP (0.95, image 2) then TP -> 1/2; dog: FP then TP -> 1/2.
    assert m["mAP"] == pytest.approx(0.5) and (m["pred_objects"], m["fp_total"]) == (4, 2)


def test_a_category_not_listed_negative_is_ignored_not_false():
    gt = [lvis_record("1.png", [("cat", A)]), lvis_record("2.png", [("dog", B)])]
    ev = evaluate_detections(gt, PREDS, semantic=False)
    assert ev.metrics["mAP"] == pytest.approx(1.0)
    assert ev.counters["lvis_unverified_ignored"] == 2


def test_unmatched_predictions_of_a_not_exhaustive_category_are_ignored_in_ap():
    gt = GT + [lvis_record("3.png", [("cat", C)], not_exhaustive=["cat"])]
    preds = PREDS + [pred("3.png", ("cat", (60, 0, 99, 40), 0.99), ("cat", C, 0.6))]
    cat = {r["category"]: r["AP"] for r in evaluate_detections(gt, preds,
                                                               semantic=False).per_class}["cat"]
    assert cat == pytest.approx(1.0)
    exhaustive = GT + [lvis_record("3.png", [("cat", C)])]
    cat = {r["category"]: r["AP"] for r in evaluate_detections(exhaustive, preds,
                                                               semantic=False).per_class}["cat"]
    assert cat == pytest.approx(2 / 3)  # FP, TP, TP: precision 2/3 at every recall point


def test_a_negative_only_category_counts_in_no_mean():
    gt = [lvis_record("1.png", [("cat", A)], neg=["zebra"])]
    ev = evaluate_detections(gt, [pred("1.png", ("cat", A, 0.9), ("zebra", B, 0.8))],
                             semantic=False)
    assert ev.metrics["mAP"] == pytest.approx(1.0)
    assert {r["category"]: r["AP"] for r in ev.per_class} == {"cat": 1.0, "zebra": None}


def test_records_with_lvis_labels_on_only_some_images_are_an_error():
    gt = [GT[0], Record("2.png", 100, 100, ())]
    with pytest.raises(UserError, match="'2.png': LVIS records need neg_categories"):
        evaluate_detections(gt, PREDS[:1], semantic=False)


def test_lvis_file_to_eval_from_the_command_line(tmp_path, capsys):
    cats = [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]
    images = [{"id": i, "coco_url": f"http://x/val2017/{i}.png", "width": 100, "height": 100,
               "neg_category_ids": neg, "not_exhaustive_category_ids": []}
              for i, neg in ((1, [9]), (2, []))]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40]},
            {"id": 2, "image_id": 2, "category_id": 9, "bbox": [20, 20, 40, 40]}]
    (tmp_path / "lvis.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                    "categories": cats}))
    gt = tmp_path / "gt.jsonl"
    assert main(["data", "lvis", "--instances", str(tmp_path / "lvis.json"), "--images",
                 str(tmp_path), "--out", str(gt)]) == 0
    preds = [pred("val2017/1.png", *SCORED[0]), pred("val2017/2.png", *SCORED[1])]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert main(["eval", "--gt", str(gt), "--pred", str(tmp_path / "p.jsonl"), "--out",
                 str(tmp_path / "ev"), "--semantic", "off"]) == 0
    assert "lvis: federated AP; unverified_ignored 1" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(0.75)
    counters = json.loads((tmp_path / "ev" / "counters.json").read_text())
    assert counters["lvis_unverified_ignored"] == 1
