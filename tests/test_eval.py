import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coordexp.cli import main
from coordexp.codec import CoordCodec
from coordexp.data.records import DetObject, Record, read_records
from coordexp.errors import UserError
from coordexp.eval import METRIC_KEYS, evaluate_detections, evaluate_records
from coordexp.eval.coco_map import DescMapper, semantic_available
from coordexp.eval.predictions import box_scores
from coordexp.parsing import ObjectTokens

CODEC = CoordCodec()
CATS = ["cat", "dog", "car", "person", "book"]
COCO_KEYS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def random_box(rng, w, h):
    x1, y1 = rng.uniform(0, w - 12), rng.uniform(0, h - 12)
    x2, y2 = rng.uniform(x1 + 2, min(w, x1 + 0.6 * w)), rng.uniform(y1 + 2, min(h, y1 + 0.6 * h))
    return (x1, y1, x2, y2)


def make_set(seed, num_images=200, constant=None):
    """GT records and scored predictions: jittered GT, some relabelled, some false positives."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(num_images):
        w, h = int(rng.integers(60, 640)), int(rng.integers(60, 640))
        objs = tuple(DetObject(str(rng.choice(CATS)), random_box(rng, w, h))
                     for _ in range(int(rng.integers(0, 9))))
        gts.append(Record(f"im{i}.png", w, h, objs))
        out = []
        for o in objs:
            if rng.random() < 0.8:
                b = np.array(o.box_px) + rng.normal(0, 0.05 * (o.box_px[2] - o.box_px[0]), 4)
                b[2:] = np.maximum(b[2:], b[:2] + 1)
                desc = o.desc if rng.random() < 0.9 else str(rng.choice(CATS))
                out.append({"desc": desc, "bbox_2d": b.tolist(), "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 3))):
            out.append({"desc": str(rng.choice(CATS)), "bbox_2d": list(random_box(rng, w, h)),
                        "score": float(rng.random())})
        if constant is not None:
            for o in out:
                o["score"] = constant
        preds.append({"images": [f"im{i}.png"], "width": w, "height": h, "objects": out})
    return gts, preds


def pycocotools_stats(gts, preds, extra_categories=()):
    """pycocotools run directly on the same boxes (categories: GT descs in first-seen order)."""
    names = list(dict.fromkeys([o.desc for r in gts for o in r.objects] + list(extra_categories)))
    cat_id = {c: k + 1 for k, c in enumerate(names)}
    anns = []
    for i, r in enumerate(gts):
        for o in r.objects:
            x1, y1, x2, y2 = o.box_px
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_id[o.desc],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
    results = [{"image_id": i + 1, "category_id": cat_id[o["desc"]], "score": o["score"],
                "bbox": [o["bbox_2d"][0], o["bbox_2d"][1], o["bbox_2d"][2] - o["bbox_2d"][0],
                         o["bbox_2d"][3] - o["bbox_2d"][1]]}
               for i, p in enumerate(preds) for o in p["objects"] if o["desc"] in cat_id]
    images = [{"id": i + 1, "width": r.width, "height": r.height} for i, r in enumerate(gts)]
    categories = [{"id": v, "name": k} for k, v in cat_id.items()]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": categories}
        gt.createIndex()
        if results:
            dt = gt.loadRes(results)
        else:  # pycocotools' loadRes cannot take an empty list
            dt = COCO()
            dt.dataset = {"images": images, "annotations": [], "categories": categories}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(COCO_KEYS, ev.stats[:9], strict=True))


def assert_coco_parity(metrics, reference):
    for k in COCO_KEYS:
        assert metrics[k] == pytest.approx(reference[k], abs=1e-6), k


def test_ap_equals_pycocotools_on_200_scored_images():
    gts, preds = make_set(0)
    metrics = evaluate_records(gts, preds, semantic=False)
    reference = pycocotools_stats(gts, preds)
    assert_coco_parity(metrics, reference)
    assert 0.1 < metrics["mAP"] < 0.9  # a set where AP is informative, not degenerate


def _no_preds():
    gts, preds = make_set(1, 40)
    return gts, [{**p, "objects": []} for p in preds], ()


def _category_without_gt():
    gts, preds = make_set(2, 40)
    for p in preds[::3]:
        p["objects"].append({"desc": "unicorn", "bbox_2d": [1, 1, 30, 30], "score": 0.99})
    return gts, preds, ("unicorn",)  # pycocotools: a class with detections and no GT


def _all_equal_scores():
    gts, preds = make_set(3, 60, constant=1.0)
    return gts, preds, ()


def _more_than_100_preds_in_one_image():
    rng = np.random.default_rng(4)
    gts = [Record("crowd.png", 640, 480, tuple(DetObject("book", random_box(rng, 640, 480))
                                                for _ in range(60)))]
    boxes = [list(random_box(rng, 640, 480)) for _ in range(90)] + [
        list(o.box_px) for o in gts[0].objects]
    preds = [{"images": ["crowd.png"], "objects": [
        {"desc": "book", "bbox_2d": b, "score": float(rng.random())} for b in boxes]}]
    return gts, preds, ()


def _image_without_gt():
    gts, preds = make_set(5, 30)
    gts[0] = Record(gts[0].image, gts[0].width, gts[0].height, ())
    return gts, preds, ()


EDGE_SETS = {"no_preds": _no_preds, "category_without_gt": _category_without_gt,
             "all_equal_scores": _all_equal_scores,
             "more_than_100_preds_in_one_image": _more_than_100_preds_in_one_image,
             "image_without_gt": _image_without_gt}


@pytest.mark.parametrize("build", list(EDGE_SETS.values()), ids=list(EDGE_SETS))
def test_ap_edge_matrix_equals_pycocotools(build):
    gts, preds, extra = build()
    assert_coco_parity(evaluate_records(gts, preds, semantic=False),
                       pycocotools_stats(gts, preds, extra))


def test_edge_values_are_what_they_should_be():
    gts, preds, _ = _no_preds()
    m = evaluate_records(gts, preds, semantic=False)
    assert (m["mAP"], m["AR100"], m["precision"], m["recall"], m["f1"]) == (0, 0, 0, 0, 0)
    gts, preds, _ = _category_without_gt()
    ev = evaluate_detections(gts, preds, semantic=False)
    assert ev.counters["coco_counter_unknown_dropped"] == len(preds[::3])
    assert ev.counters["unknown_descs"] == ["unicorn"]
    assert ev.metrics["pred_objects"] == sum(len(p["objects"]) for p in preds)  # F1 keeps them


def test_constant_score_option_ranks_by_emission_order():
    gts, preds = make_set(6, 40)
    equal = [{**p, "objects": [{**o, "score": 1.0} for o in p["objects"]]} for p in preds]
    asked = evaluate_records(gts, preds, semantic=False, constant_score=1.0)
    assert asked == evaluate_records(gts, equal, semantic=False)
    assert asked["mAP"] != evaluate_records(gts, preds, semantic=False)["mAP"]


def test_no_ground_truth_at_all_gives_undefined_ap():
    gts = [Record("a.png", 10, 10, ())]
    preds = [{"images": ["a.png"], "objects": [{"desc": "x", "bbox_2d": [1, 1, 5, 5],
                                                "score": 0.5}]}]
    m = evaluate_records(gts, preds, semantic=False)
    assert m["mAP"] == -1.0 and m["fp_total"] == 1 and m["recall"] == 0.0


# -- matching-based F1 ----------------------------------------------------------------------

def test_f1_counts_on_a_hand_built_case():
    gts = [Record("a.png", 100, 100, (DetObject("cat", (0, 0, 10, 10)),
                                      DetObject("dog", (50, 50, 60, 60)))),
           Record("b.png", 100, 100, (DetObject("cat", (0, 0, 20, 20)),))]
    preds = [
        {"images": ["a.png"], "objects": [
            {"desc": "cat", "bbox_2d": [0, 0, 10, 10], "score": 0.9},  # IoU 1
            {"desc": "dog", "bbox_2d": [52, 50, 62, 60], "score": 0.8},  # IoU 2/3
            {"desc": "dog", "bbox_2d": [80, 80, 90, 90], "score": 0.7}]},  # FP
        {"images": ["b.png"], "objects": [
            {"desc": "cat", "bbox_2d": [0, 0, 20, 8], "score": 0.9}]},  # IoU 0.4
    ]
    m = evaluate_records(gts, preds, semantic=False)
    assert tuple(m) == METRIC_KEYS
    assert (m["pred_objects"], m["gt_objects_total"], m["matched"]) == (4, 3, 3)
    assert (m["fp_total"], m["fn_total"]) == (1, 0)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert m["matched_iou_mean"] == pytest.approx((1 + 2 / 3 + 0.4) / 3)
    assert m["f1@0.5"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert m["f1@0.75"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert m["gating_rejections"] == 4  # a.png: 6 candidate pairs, 2 feasible; b.png: none


def test_f1_is_class_agnostic_and_ap_is_not():
    gts = [Record("a.png", 100, 100, (DetObject("cat", (0, 0, 10, 10)),))]
    preds = [{"images": ["a.png"], "objects": [{"desc": "dog", "bbox_2d": [0, 0, 10, 10],
                                                 "score": 1.0}]}]
    m = evaluate_records(gts, preds, semantic=False)
    assert m["f1"] == 1.0 and m["mAP"] == 0.0


# -- predictions from raw text and token log-probabilities ----------------------------------

def test_geometric_mean_and_fused_scores():
    logp = np.log([0.5, 0.9, 0.8, 0.4, 0.2, 0.1])
    tok = [ObjectTokens(desc=[0, 1], coords=[2, 3, 4, 5])]
    geom = (0.8 * 0.4 * 0.2 * 0.1) ** 0.25
    assert box_scores(logp, tok) == pytest.approx([geom])
    assert box_scores(logp, tok, desc_weight=0.3) == pytest.approx([0.7 * geom + 0.3 * 0.7])
    with pytest.raises(ValueError, match="desc_weight"):
        box_scores(logp, tok, desc_weight=2.0)


def rollout_pieces(objects):
    """Token pieces of an answer: coord literals one token each, other text in 3-char chunks."""
    import re

    body = ", ".join('{"desc": ' + json.dumps(d) + ', "bbox_2d": ['
                     + ", ".join(CODEC.token(k) for k in b) + "]}" for d, b in objects)
    return re.findall(r"<\|coord_\d+\|>|[^<]{1,3}", '{"objects": [' + body + "]}")


def test_raw_text_predictions_are_parsed_scored_and_counted():
    box_px = CODEC.box_bins_to_px([100, 100, 300, 300], 640, 480)
    gts = [Record("a.png", 640, 480, (DetObject("cat", tuple(box_px)),))]
    pieces = rollout_pieces([("cat", [100, 100, 300, 300]), ("dog", [1, 2, 3])])
    logprobs = [math.log(0.5) if p.startswith("<|coord_") else 0.0 for p in pieces]
    preds = [{"images": ["a.png"], "raw_text": "".join(pieces), "token_pieces": pieces,
              "token_logprobs": logprobs}]
    ev = evaluate_detections(gts, preds, semantic=False)
    assert ev.metrics["matched"] == 1 and ev.metrics["matched_iou_mean"] == pytest.approx(1.0)
    assert ev.metrics["mAP"] == pytest.approx(1.0)
    assert ev.counters["parse_dropped_invalid"] == 1
    assert ev.counters["parse_dropped_wrong_arity"] == 1
    assert ev.per_image[0]["pred_objects"] == 1


def test_raw_text_without_logprobs_needs_constant_score():
    gts = [Record("a.png", 100, 100, (DetObject("cat", (0, 0, 10, 10)),))]
    preds = [{"images": ["a.png"], "raw_text": "I see nothing"}]
    with pytest.raises(UserError, match="constant_score"):
        evaluate_records(gts, preds)
    ev = evaluate_detections(gts, preds, constant_score=1.0, semantic=False)
    assert ev.counters["parse_invalid_rollout"] == 1 and ev.metrics["fn_total"] == 1


# -- desc -> category mapping ---------------------------------------------------------------

def test_exact_mapping_works_without_the_encoder():
    mapper = DescMapper(["traffic light", "dog"], semantic=False)
    assert mapper.map(["dog", "Traffic_Light", "puppy"]) == [1, 0, -1]


@pytest.mark.skipif(not semantic_available(), reason="the semantic extra is not installed")
def test_semantic_mapping_uses_minilm_threshold():
    mapper = DescMapper(["dog", "car", "dining table"], semantic=True)
    assert mapper.map(["puppy", "automobile", "qwerty"]) == [0, 1, -1]


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize(("pred", "message"), [
    ({"images": ["a.png"], "objects": [{"desc": "cat", "bbox_2d": [0, 0, 5, 5]}]}, "score"),
    ({"images": ["a.png"], "width": 99, "objects": []}, "width 99 differs"),
    ({"images": ["a.png"], "objects": [{"desc": "cat", "bbox_2d": [0, 0, 5], "score": 1}]},
     "bbox_2d"),
    ({"images": ["a.png"]}, "needs 'objects'"),
    ({"images": "a.png", "objects": []}, "'images'"),
    ({"images": ["a.png"], "objects": [{"desc": "cat", "bbox_2d": [0, 0, True, 5], "score": 1}]},
     "bbox_2d"),
    ({"images": ["a.png"], "objects": [{"desc": "cat", "bbox_2d": [0, 0, 5, 5],
                                        "score": float("nan")}]}, "finite"),
], ids=["missing_score", "size_mismatch", "short_box", "no_objects", "images_not_a_list",
        "boolean_coordinate", "nan_score"])
def test_bad_prediction_records_name_the_record(pred, message):
    gts = [Record("a.png", 100, 100, ())]
    with pytest.raises(UserError, match=message) as err:
        evaluate_records(gts, [pred])
    assert "pred record 0" in str(err.value)


def test_duplicate_and_unknown_images_are_errors():
    gts = [Record("a.png", 100, 100, ()), Record("b.png", 100, 100, ())]
    p = {"images": ["a.png"], "objects": []}
    with pytest.raises(UserError, match="pred record 1: image 'a.png' already has"):
        evaluate_records(gts, [p, p])
    with pytest.raises(UserError, match="pred record 1: image 'c.png' is not in the ground"):
        evaluate_records(gts, [p, {"images": ["c.png"], "objects": []}])


# -- the command ----------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def files(tmp_path):
    gts, preds = make_set(7, 12)
    gt = write_jsonl(tmp_path / "gt.jsonl", [r.to_json() for r in gts])
    pred = write_jsonl(tmp_path / "pred.jsonl", preds)
    return tmp_path, gt, pred


def test_eval_command_writes_metrics_and_prints_a_table(files, capsys):
    tmp, gt, pred = files
    assert main(["eval", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp / "out")]) == 0
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    assert tuple(metrics) == METRIC_KEYS
    assert len(json.loads((tmp / "out" / "per_image.json").read_text())) == 12
    assert (tmp / "out" / "per_class.csv").read_text().startswith("category,gt_objects")
    assert "mAP" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_gt", "missing_pred", "malformed_pred_line",
                                  "no_image_matches", "malformed_gt_line"])
def test_eval_command_bad_input_exits_2_naming_the_place(files, capsys, case):
    tmp, gt, pred = files
    lines = pred.read_text().splitlines()
    if case == "missing_gt":
        gt, expected = tmp / "nope.jsonl", f"{tmp / 'nope.jsonl'}: no such file"
    elif case == "missing_pred":
        pred, expected = tmp / "nope.jsonl", f"{tmp / 'nope.jsonl'}: no such file"
    elif case == "malformed_pred_line":
        write_jsonl(pred, lines[:2] + ['{"images": ["im2.png"], "objects": [}'] + lines[3:])
        expected = f"{pred}:3: malformed JSON"
    elif case == "no_image_matches":
        write_jsonl(pred, [{"images": ["other/im0.png"], "objects": []}])
        expected = f"{pred}: none of its 1 records names an image of the ground truth"
    else:
        write_jsonl(gt, gt.read_text().splitlines()[:4] + ["{not json"])
        expected = f"{gt}:5: malformed JSON"
    code = main(["eval", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_eval_command_options_reach_the_evaluation(files):
    """--constant-score and --iou-gate change exactly what the library options change."""
    tmp, gt, pred = files
    gts = read_records(gt, check_images=False)
    preds = [json.loads(line) for line in pred.read_text().splitlines()]
    args = ["eval", "--gt", str(gt), "--pred", str(pred), "--semantic", "off"]
    runs = {"default": ([], {}), "constant": (["--constant-score", "1"], {"constant_score": 1.0}),
            "gated": (["--iou-gate", "0.7"], {"iou_gate": 0.7})}
    metrics = {}
    for name, (flags, opts) in runs.items():
        assert main(args + ["--out", str(tmp / name)] + flags) == 0
        metrics[name] = json.loads((tmp / name / "metrics.json").read_text())
        assert metrics[name] == pytest.approx(evaluate_records(gts, preds, semantic=False, **opts))
    assert metrics["constant"]["mAP"] != metrics["default"]["mAP"]
    assert metrics["gated"]["matched"] < metrics["default"]["matched"]
    assert metrics["gated"]["mAP"] == metrics["default"]["mAP"]


@pytest.mark.parametrize("flags", [["--iou-gate", "1.5"], ["--semantic-threshold", "x"],
                                   ["--semantic", "maybe"]])
def test_eval_command_bad_options_exit_2(files, capsys, flags):
    tmp, gt, pred = files
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp / "o"), *flags])
    assert stop.value.code == 2 and flags[0] in capsys.readouterr().err


def test_semantic_on_without_the_encoder_exits_2(files, capsys, monkeypatch):
    from coordexp.eval import evaluate

    monkeypatch.setattr(evaluate, "semantic_available", lambda: False)
    tmp, gt, pred = files
    assert main(["eval", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp / "o"),
                 "--semantic", "on"]) == 2
    assert "pip install 'coordexp[semantic]'" in capsys.readouterr().err
    assert not (tmp / "o").exists()
