"""Work is bounded by what is kept, not by what is given: matching memory grows with the
candidates (P x candidate_top_k), never with P x G, and evaluation caps predictions per image
with a counted overflow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from coordexp import matching
from coordexp.cli import main
from coordexp.eval.predictions import Prediction, cap_predictions
from coordexp.matching import match_boxes, match_boxes_batched, pairwise_iou

PEAK_MB = 500


def grid_scene(n_pred: int, seed: int = 0) -> tuple[dict, dict]:
    """100 GT boxes on a 10 x 10 grid of a 1000 px image and n_pred jittered copies of them."""
    rng = np.random.default_rng(seed)
    gt = [[100 * (i % 10) + 10, 100 * (i // 10) + 10, 100 * (i % 10) + 80,
           100 * (i // 10) + 80] for i in range(100)]
    boxes = np.asarray(gt, float)[rng.integers(0, 100, n_pred)] + rng.normal(0, 4, (n_pred, 4))
    boxes = np.clip(boxes, 0, 1000).round(1)
    head = {"images": ["img.png"], "width": 1000, "height": 1000}
    objs = [{"desc": "box", "score": float(s), "bbox_2d": b}
            for b, s in zip(boxes.tolist(), rng.uniform(0, 1, n_pred).round(4), strict=True)]
    return (head | {"objects": [{"desc": "box", "bbox_2d": b} for b in gt]},
            head | {"objects": objs})


# VmHWM: this process's own peak resident memory (getrusage's ru_maxrss would also count the
# pytest process it was forked from)
PROBE = """
import sys
from pathlib import Path
from coordexp.cli import main
code = main(sys.argv[1:])
status = Path("/proc/self/status").read_text().splitlines()
print("peak_kb", next(x for x in status if x.startswith("VmHWM")).split()[1], "code", code)
"""


def test_25000_predictions_on_one_image_evaluate_within_500_mb(tmp_path):
    gt, pred = grid_scene(25_000)
    (tmp_path / "gt.jsonl").write_text(json.dumps(gt) + "\n")
    (tmp_path / "pred.jsonl").write_text(json.dumps(pred) + "\n")
    src = Path(matching.__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "eval", "--gt", str(tmp_path / "gt.jsonl"), "--pred",
         str(tmp_path / "pred.jsonl"), "--out", str(tmp_path / "o"), "--semantic", "off",
         "--max-preds-per-image", "25000"],
        capture_output=True, text=True, env={"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"},
        check=True)
    peak_kb = int(out.stdout.split("peak_kb")[1].split()[0])  # the whole process, imports too
    assert peak_kb < PEAK_MB * 1024, out.stdout
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["pred_objects"] == 25_000 and metrics["matched"] == 100  # every GT found
    assert metrics["fp_total"] == 24_900


def test_eval_caps_predictions_per_image_and_counts_the_rest(tmp_path, capsys):
    gt, pred = grid_scene(300, seed=1)
    (tmp_path / "gt.jsonl").write_text(json.dumps(gt) + "\n")
    (tmp_path / "pred.jsonl").write_text(json.dumps(pred) + "\n")
    assert main(["eval", "--gt", str(tmp_path / "gt.jsonl"), "--pred", str(tmp_path / "pred.jsonl"),
                 "--out", str(tmp_path / "o"), "--semantic", "off",
                 "--max-preds-per-image", "120"]) == 0
    assert "pred_over_cap_dropped 180" in capsys.readouterr().out
    counters = json.loads((tmp_path / "o" / "counters.json").read_text())
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert counters["pred_over_cap_dropped"] == 180 and metrics["pred_objects"] == 120


def test_cap_keeps_the_best_scores_in_emission_order():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    p = Prediction("a.png", 10, 10, list("abcde"), np.tile([0.0, 0, 5, 5], (5, 1)), scores, {})
    (kept,), dropped = cap_predictions([p], 3)
    assert kept.descs == ["b", "c", "d"] and kept.scores.tolist() == [0.9, 0.5, 0.9]
    assert dropped == 2 and cap_predictions([p, None], 5) == ([p, None], 0)


def dense_reference_cost(pred, gt, top_k, gate, fp_cost, fn_cost) -> float:
    """The dense (P+G) x (G+P) Hungarian the sparse solver replaces."""
    iou = pairwise_iou(pred, gt)
    p, g = iou.shape
    feasible = np.zeros_like(iou, dtype=bool)
    for i in range(p):
        if iou[i].max() > 0:
            order = sorted(range(g), key=lambda j: (-iou[i, j], j))
        else:
            c = (pred[i, :2] + pred[i, 2:]) - (gt[:, :2] + gt[:, 2:])
            d = (c ** 2).sum(1)
            order = sorted(range(g), key=lambda j: (d[j], j))
        for j in order[:top_k]:
            feasible[i, j] = iou[i, j] >= gate
    big = 1e9
    cost = np.zeros((p + g, g + p))
    cost[:p, :g] = np.where(feasible, 1 - iou, big)
    cost[:p, g:] = np.where(np.eye(p, dtype=bool), fp_cost, big)
    cost[p:, :g] = np.where(np.eye(g, dtype=bool), fn_cost, big)
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].sum())


@pytest.mark.parametrize("seed", range(8))
def test_sparse_assignment_equals_dense_hungarian(seed, monkeypatch):
    monkeypatch.setattr(matching, "DENSE_CELLS", 0)  # every tangled image solved sparsely
    rng = np.random.default_rng(seed)
    g = int(rng.integers(5, 40))
    gt = rng.uniform(0, 200, (g, 2))
    gt = np.concatenate([gt, gt + rng.uniform(10, 60, (g, 2))], 1)
    pred = np.concatenate([gt[rng.integers(0, g, 60)] + rng.normal(0, 6, (60, 4)),
                           rng.uniform(0, 250, (10, 4))])
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
    opts = {"candidate_top_k": int(rng.choice([1, 3, 10])), "iou_gate": 0.3,
            "fp_cost": float(rng.choice([0.4, 1.0])), "fn_cost": 1.0}
    m = match_boxes(pred, gt, **opts)
    cost = (sum(1 - v for v in m.matched_ious) + opts["fp_cost"] * len(m.fp_indices)
            + opts["fn_cost"] * len(m.fn_indices))
    expected = dense_reference_cost(pred, gt, opts["candidate_top_k"], 0.3, opts["fp_cost"],
                                    opts["fn_cost"])
    assert cost == pytest.approx(expected, abs=1e-9)
    assert len({i for i, _ in m.pairs}) == len({j for _, j in m.pairs}) == len(m.pairs)


def test_pair_budget_does_not_change_matches(monkeypatch):
    rng = np.random.default_rng(5)
    preds, gts = [], []
    for _ in range(12):
        gt = rng.uniform(0, 80, (int(rng.integers(0, 9)), 2))
        gt = np.concatenate([gt, gt + rng.uniform(5, 30, gt.shape)], 1)
        preds.append(np.concatenate([gt + rng.normal(0, 3, gt.shape),
                                     rng.uniform(0, 90, (int(rng.integers(0, 4)), 4))]))
        gts.append(gt)
    opts = {"candidate_top_k": 2, "iou_gate": 0.2, "fp_cost": 0.7, "fn_cost": 1.0}
    whole = match_boxes_batched(preds, gts, **opts)
    monkeypatch.setattr(matching, "PAIR_BUDGET", 5)  # a few preds per run of pairs
    assert match_boxes_batched(preds, gts, **opts) == whole
    assert any(m.pairs for m in whole)
