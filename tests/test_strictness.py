"""Input the project used to change silently: prediction scores outside [0, 1] (GT object keys
and parsed desc whitespace are pinned in test_records.py and test_parsing.py)."""

import json

import pytest

from coordexp.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("score", [1.2, -0.01])
def test_prediction_score_outside_unit_interval_exits_2_naming_file_and_line(tmp_path, capsys,
                                                                             score):
    gt = write_jsonl(tmp_path / "gt.jsonl", [
        {"images": [f"{n}.png"], "width": 20, "height": 20,
         "objects": [{"desc": "cat", "bbox_2d": [1, 1, 9, 9]}]} for n in "ab"])
    box = {"desc": "cat", "bbox_2d": [1, 1, 9, 9]}
    pred = write_jsonl(tmp_path / "pred.jsonl", [
        {"images": ["a.png"], "objects": [{**box, "score": 1.0}]},
        {"images": ["b.png"], "objects": [{**box, "score": 0.0}, {**box, "score": score}]}])
    code = main(["eval", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "ev"),
                 "--semantic", "off"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{pred}:2: object 1: score {score} is outside [0, 1]" in err


def test_scores_at_both_ends_of_the_interval_are_accepted(tmp_path, capsys):
    cat = {"desc": "cat", "bbox_2d": [1, 1, 9, 9]}
    gt = write_jsonl(tmp_path / "gt.jsonl",
                     [{"images": ["a.png"], "width": 20, "height": 20, "objects": [cat]}])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"images": ["a.png"], "objects": [
        {"desc": "cat", "bbox_2d": [1, 1, 9, 9], "score": 1},
        {"desc": "cat", "bbox_2d": [11, 11, 19, 19], "score": 0}]}])
    assert main(["eval", "--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "ev"),
                 "--semantic", "off"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["matched"] == 1 and metrics["fp_total"] == 1
