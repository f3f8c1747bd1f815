"""Coordinate decode (expectation, argmax, straight-through) and box IoU family."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from coordexp.boxes import (
    box_area,
    box_iou,
    canonicalize_boxes,
    complete_box_iou,
    generalized_box_iou,
    paired_complete_box_iou,
)
from coordexp.codec import CoordCodec
from coordexp.decode import argmax_coord, decode_coords, expected_coord, straight_through

CODEC = CoordCodec()
K = CODEC.num_bins


# -- decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 500, K - 2, K - 1])
def test_expectation_of_one_hot_is_its_bin(k):
    logits = torch.full((K,), -1e4)
    logits[k] = 0.0
    assert_close(expected_coord(logits), torch.tensor(CODEC.bin_to_norm(k)))
    assert_close(argmax_coord(logits), torch.tensor(CODEC.bin_to_norm(k)))


def test_expectation_keeps_leading_shape_and_stays_in_unit_range():
    logits = torch.randn(2, 3, 4, K) * 5
    out = expected_coord(logits, temperature=0.5)
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    assert (out >= 0).all() and (out <= 1).all()


def test_expectation_gradient_identity():
    """d c / d s_k = (1 / tau) * p_k * (k / (K - 1) - c)."""
    tau = 0.8
    logits = torch.randn(50, dtype=torch.float64, requires_grad=True)
    c = expected_coord(logits, temperature=tau)
    c.backward()
    p = torch.softmax(logits.detach() / tau, -1)
    grid = torch.arange(50, dtype=torch.float64) / 49
    assert_close(logits.grad, p * (grid - c.detach()) / tau)


def test_straight_through_forwards_hard_and_backpropagates_soft():
    soft_in = torch.tensor([0.2, 0.7], requires_grad=True)
    soft = soft_in * 3
    hard = torch.tensor([1.0, 2.0])
    out = straight_through(hard, soft)
    assert_close(out, hard)
    (out * torch.tensor([1.0, 10.0])).sum().backward()
    assert_close(soft_in.grad, torch.tensor([3.0, 30.0]))


def test_decode_modes_exp_and_st():
    logits = torch.randn(7, K, requires_grad=True)
    exp = decode_coords(logits, "exp", temperature=0.9)
    assert_close(exp, expected_coord(logits, temperature=0.9))
    st = decode_coords(logits, "st", temperature=0.9)
    assert_close(st, argmax_coord(logits))
    (grad_st,) = torch.autograd.grad(st.sum(), logits)
    (grad_exp,) = torch.autograd.grad(exp.sum(), logits)
    assert_close(grad_st, grad_exp)
    with pytest.raises(ValueError, match="coord_decode_mode"):
        decode_coords(logits, "hard")


# -- boxes -----------------------------------------------------------------------------------
def inter_union_loop(a: list[float], b: list[float]) -> tuple[float, float]:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return iw * ih, area_a + area_b - iw * ih


def iou_loop(a: list[float], b: list[float]) -> float:
    inter, union = inter_union_loop(a, b)
    return inter / union


def ciou_scalar(a: list[float], b: list[float]) -> float:
    """CIoU written out for one pair of proper boxes, independent of the vectorised code."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a, b
    rho2 = ((ax1 + ax2 - bx1 - bx2) / 2) ** 2 + ((ay1 + ay2 - by1 - by2) / 2) ** 2
    c2 = (max(ax2, bx2) - min(ax1, bx1)) ** 2 + (max(ay2, by2) - min(ay1, by1)) ** 2
    angle_gap = math.atan((bx2 - bx1) / (by2 - by1)) - math.atan((ax2 - ax1) / (ay2 - ay1))
    v = 4 / math.pi**2 * angle_gap**2
    iou = iou_loop(a, b)
    return iou - rho2 / c2 - v / (1 - iou + v) * v


def random_boxes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.7
    size = 0.05 + 0.4 * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    return torch.cat([lo, lo + size], 1)


def test_box_iou_equals_brute_force_loop():
    a, b = random_boxes(6, 0), random_boxes(9, 1)
    b[3] = a[2]  # one exact match
    expected = [[iou_loop(x, y) for y in b.tolist()] for x in a.tolist()]
    iou = box_iou(a, b)
    assert iou.shape == (6, 9)
    assert_close(iou, torch.tensor(expected, dtype=torch.float64))
    assert_close(iou[2, 3], torch.tensor(1.0, dtype=torch.float64))


def test_generalized_iou_is_iou_minus_empty_enclosure_fraction():
    a, b = random_boxes(5, 2), random_boxes(4, 3)
    expected = torch.empty(5, 4, dtype=torch.float64)
    for i, j in itertools.product(range(5), range(4)):
        x, y = a[i].tolist(), b[j].tolist()
        enclose = (max(x[2], y[2]) - min(x[0], y[0])) * (max(x[3], y[3]) - min(x[1], y[1]))
        inter, union = inter_union_loop(x, y)
        expected[i, j] = inter / union - (enclose - union) / enclose
    assert_close(generalized_box_iou(a, b), expected)
    assert (generalized_box_iou(a, b) <= box_iou(a, b) + 1e-12).all()


def test_complete_iou_matches_scalar_formula_and_paired_form():
    a, b = random_boxes(4, 4), random_boxes(3, 5)
    expected = [[ciou_scalar(x, y) for y in b.tolist()] for x in a.tolist()]
    pairwise = complete_box_iou(a, b)
    assert_close(pairwise, torch.tensor(expected, dtype=torch.float64))
    assert_close(paired_complete_box_iou(a[:3], b), pairwise[[0, 1, 2], [0, 1, 2]])


def test_complete_iou_of_identical_boxes_is_one():
    a = random_boxes(5, 6)
    assert_close(paired_complete_box_iou(a, a), torch.ones(5, dtype=torch.float64))
    assert_close(complete_box_iou(a, a).diagonal(), torch.ones(5, dtype=torch.float64))


def test_disjoint_and_empty_sets():
    a = torch.tensor([[0.0, 0.0, 0.1, 0.1]])
    b = torch.tensor([[0.5, 0.5, 0.9, 0.9]])
    assert box_iou(a, b).item() == 0.0
    assert generalized_box_iou(a, b).item() < 0
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 1)
    assert complete_box_iou(a, torch.zeros(0, 4)).shape == (1, 0)


def test_canonicalize_orders_axes_and_clamps():
    boxes = torch.tensor([[0.8, 0.9, 0.2, 0.1], [-0.2, 0.3, 1.4, 0.5]])
    expected = torch.tensor([[0.2, 0.1, 0.8, 0.9], [0.0, 0.3, 1.0, 0.5]])
    assert_close(canonicalize_boxes(boxes), expected)
    assert_close(box_area(expected), torch.tensor([0.6 * 0.8, 1.0 * 0.2]))
