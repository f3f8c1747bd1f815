import itertools

import numpy as np
import pytest

from coordexp.matching import (
    build_pair_table,
    count_matches,
    match_boxes,
    match_boxes_batched,
    pairwise_iou,
)


def random_boxes(rng, n, scale=100.0):
    xy = rng.uniform(0, scale, size=(n, 2))
    wh = rng.uniform(5, scale / 2, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def near(rng, boxes, jitter):
    return boxes + rng.normal(0, jitter, size=boxes.shape)


def total_cost(m, num_pred, num_gt, fp_cost=1.0, fn_cost=1.0):
    return (sum(1 - v for v in m.matched_ious) + fp_cost * len(m.fp_indices)
            + fn_cost * len(m.fn_indices))


def brute_force_cost(pred, gt, top_k, gate, fp_cost, fn_cost):
    """Minimum cost over every partial 1:1 assignment, with the same feasibility rule."""
    iou = pairwise_iou(pred, gt)
    feasible = np.zeros_like(iou, dtype=bool)
    for i in range(len(pred)):
        centre = (pred[i, :2] + pred[i, 2:]) / 2
        dist = [float(((centre - (g[:2] + g[2:]) / 2) ** 2).sum()) for g in gt]
        if len(gt) and iou[i].max() > 0:
            ranked = sorted(range(len(gt)), key=lambda j: (-iou[i, j], j))[:top_k]
        else:  # nothing overlaps: the nearest centres are the candidates
            ranked = sorted(range(len(gt)), key=lambda j: (dist[j], j))[:top_k]
        for j in ranked:
            feasible[i, j] = iou[i, j] >= gate
    best = fp_cost * len(pred) + fn_cost * len(gt)
    for m in range(1, min(len(pred), len(gt)) + 1):
        for preds in itertools.combinations(range(len(pred)), m):
            for gts in itertools.permutations(range(len(gt)), m):
                if all(feasible[i, j] for i, j in zip(preds, gts, strict=True)):
                    cost = (sum(1 - iou[i, j] for i, j in zip(preds, gts, strict=True))
                            + fp_cost * (len(pred) - m) + fn_cost * (len(gt) - m))
                    best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_matching_equals_brute_force_for_small_sets(seed):
    rng = np.random.default_rng(seed)
    num_gt, num_pred = rng.integers(0, 6, size=2)
    scale = 60 if seed % 3 else 20  # small scenes: every box overlaps several others
    gt = random_boxes(rng, num_gt, scale=scale)
    num_near = min(num_pred // 2, num_gt)
    pred = np.concatenate([near(rng, gt[:num_near], scale / 10),
                           random_boxes(rng, num_pred - num_near, scale)])
    top_k = int(rng.choice([1, 2, 10]))
    gate = float(rng.choice([0.0, 0.3, 0.5]))
    fp_cost, fn_cost = (1.0, 1.0) if seed % 2 else (0.2, 0.3)  # cheap dummies: some pairs lose
    m = match_boxes(pred, gt, candidate_top_k=top_k, iou_gate=gate, fp_cost=fp_cost,
                    fn_cost=fn_cost)
    expected = brute_force_cost(pred, gt, top_k, gate, fp_cost, fn_cost)
    assert total_cost(m, num_pred, num_gt, fp_cost, fn_cost) == pytest.approx(expected, abs=1e-9)
    assert sorted([i for i, _ in m.pairs] + m.fp_indices) == list(range(num_pred))
    assert sorted([j for _, j in m.pairs] + m.fn_indices) == list(range(num_gt))


@pytest.mark.parametrize("seed", range(10))
def test_permuting_gt_permutes_pairs_and_keeps_cost(seed):
    rng = np.random.default_rng(100 + seed)
    gt = random_boxes(rng, 8)
    pred = np.concatenate([near(rng, gt[:6], 4), random_boxes(rng, 3)])
    perm = rng.permutation(len(gt))
    a = match_boxes(pred, gt)
    b = match_boxes(pred, gt[perm])
    assert total_cost(b, 9, 8) == pytest.approx(total_cost(a, 9, 8), abs=1e-12)
    assert [(i, int(perm[j])) for i, j in b.pairs] == a.pairs
    assert sorted(int(perm[j]) for j in b.fn_indices) == a.fn_indices
    assert b.fp_indices == a.fp_indices and b.gating_rejections == a.gating_rejections


def test_gate_is_respected_and_rejections_counted():
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=float)
    pred = np.array([[0, 0, 10, 5], [52, 50, 62, 60]], dtype=float)  # IoU 0.5 and 8/12
    m = match_boxes(pred, gt, iou_gate=0.6)
    assert m.pairs == [(1, 1)] and m.fp_indices == [0] and m.fn_indices == [0]
    assert m.matched_ious == pytest.approx([8 / 12])
    assert m.gating_rejections == 3  # (0,0) at IoU 0.5 and the two disjoint pairs
    assert all(v >= 0.6 for v in m.matched_ious)


def test_identical_sets_match_one_to_one():
    rng = np.random.default_rng(7)
    gt = random_boxes(rng, 12)
    m = match_boxes(gt[::-1].copy(), gt)
    assert m.pairs == [(i, 11 - i) for i in range(12)]
    assert m.matched_ious == pytest.approx([1.0] * 12)
    assert m.fp_indices == [] and m.fn_indices == []


def test_top_k_prunes_feasible_pairs():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], dtype=float)
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5]], dtype=float)
    # pred 1's best GT is GT 0 (IoU 0.95 > 0.947); with k=1 it may only take GT 0
    m = match_boxes(pred, gt, candidate_top_k=1)
    assert m.pairs == [(0, 0)] and m.fp_indices == [1] and m.fn_indices == [1]
    assert len(match_boxes(pred, gt, candidate_top_k=2).pairs) == 2


def test_zero_iou_falls_back_to_centre_distance_with_zero_gate():
    gt = np.array([[0, 0, 1, 1], [10, 10, 11, 11], [50, 50, 51, 51]], dtype=float)
    pred = np.array([[12, 12, 13, 13]], dtype=float)  # overlaps nothing; nearest is GT 1
    m = match_boxes(pred, gt, candidate_top_k=1, iou_gate=0.0)
    assert m.pairs == [(0, 1)] and m.gating_rejections == 0


@pytest.mark.parametrize(("num_pred", "num_gt"), [(0, 0), (0, 3), (4, 0)],
                         ids=["both_empty", "no_preds", "no_gt"])
def test_empty_sides(num_pred, num_gt):
    rng = np.random.default_rng(0)
    m = match_boxes(random_boxes(rng, num_pred), random_boxes(rng, num_gt))
    assert m.pairs == [] and m.matched_ious == [] and m.gating_rejections == 0
    assert m.fp_indices == list(range(num_pred)) and m.fn_indices == list(range(num_gt))


def test_empty_and_inverted_boxes_have_zero_iou():
    a = np.array([[5, 5, 5, 9], [9, 9, 1, 1], [0, 0, 4, 4]], dtype=float)
    iou = pairwise_iou(a, a)
    assert iou[2, 2] == 1.0 and iou[0, 0] == 0.0 and iou[1, 1] == 0.0
    assert np.isfinite(iou).all()


def test_batched_matching_equals_per_image():
    rng = np.random.default_rng(3)
    preds, gts = [], []
    for n in range(30):
        scale = 20 if n % 2 else 80  # crowded and sparse images alternate
        gt = random_boxes(rng, int(rng.integers(0, 14)), scale)
        pred = np.concatenate([near(rng, gt, scale / 10), random_boxes(rng, int(rng.integers(0, 4)),
                                                                        scale)])
        preds.append(pred)
        gts.append(gt)
    opts = {"candidate_top_k": 3, "iou_gate": 0.3, "fp_cost": 0.5, "fn_cost": 2.0}
    batched = match_boxes_batched(preds, gts, **opts)
    assert batched == [match_boxes(p, g, **opts) for p, g in zip(preds, gts, strict=True)]
    assert any(m.pairs for m in batched) and any(m.fp_indices for m in batched)
    counts = count_matches(build_pair_table(preds, gts, 3), iou_gate=0.3, fp_cost=0.5,
                           fn_cost=2.0)
    assert counts.tolist() == [len(m.pairs) for m in batched]
