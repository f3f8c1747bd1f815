"""Inputs that used to be silently wrong now either work as documented or are counted:
`data coco` counts every skipped annotation by reason, the config keys it names exist, and
every metric training.metric_for_best accepts is one that evaluation produces."""

import json

import numpy as np

from coordexp.cli import main
from coordexp.config import BEST_METRICS, Config, config_to_dict, load_config
from coordexp.data.records import DetObject, Record, read_records
from coordexp.eval.predictions import PARSE_COUNTERS, Prediction
from coordexp.train.evaluation import score_predictions


def test_coco_conversion_counts_every_skipped_annotation_by_reason(tmp_path, capsys):
    images = [{"id": i, "file_name": f"{i}.png", "width": 10, "height": 10} for i in (1, 2)]
    ann = {"image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]}
    annotations = [ann | {"id": 1}, ann | {"id": 2, "iscrowd": 1},
                   ann | {"id": 3, "bbox": [20, 20, 2, 2]},  # outside: degenerate after clipping
                   *[ann | {"id": 10 + i, "image_id": 2} for i in range(3)]]  # over max objects
    inst = {"images": images, "categories": [{"id": 3, "name": "cat"}],
            "annotations": annotations}
    (tmp_path / "i.json").write_text(json.dumps(inst))
    assert main(["data", "coco", "--instances", str(tmp_path / "i.json"), "--images",
                 str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--max-objects", "2"]) == 0
    out = capsys.readouterr().out
    for note in ("1 crowd annotations", "1 degenerate boxes", "1 images over max objects",
                 "3 annotations in images over max objects"):
        assert note in out
    (rec,) = read_records(tmp_path / "o.jsonl", check_images=False)
    kept = len(rec.objects)
    assert kept + 1 + 1 + 3 == len(annotations)  # every annotation kept or counted


def test_every_metric_for_best_is_produced_by_evaluation():
    record = Record("a.png", 10, 10, (DetObject("cat", (0.0, 0.0, 5.0, 5.0)),))
    pred = Prediction("a.png", 10, 10, ["cat"], np.array([[0.0, 0.0, 5.0, 5.0]]),
                      np.array([0.9]), dict.fromkeys(PARSE_COUNTERS, 0), "",
                      np.array([[0, 0, 499, 499]]))
    metrics, _ = score_predictions([record], [pred], Config())
    assert set(BEST_METRICS) <= set(metrics)
    assert all(metrics[k] == 1.0 for k in ("rollout/f1", "rollout/precision", "rollout/recall"))


def test_resolved_config_round_trips_through_the_strict_loader(tmp_path):
    import yaml

    cfg = load_config(None, ["model.init_tiny=qwen3_vl", "data.train=x.jsonl",
                             "training.learning_rate=2e-4", "data.val_limit=3"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(tmp_path / "r.yaml") == cfg
