"""Losses: analytic values, parity with torch references, gradchecks and empty inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from coordexp.codec import CoordCodec
from coordexp.losses import (
    bbox_ciou,
    bbox_smoothl1,
    coord_gate,
    coord_gate_from_lse,
    coord_hard_ce,
    coord_soft_ce,
    coord_w1,
    gaussian_targets,
    text_gate,
    text_gate_from_lse,
    weighted_mean,
)

K = CoordCodec().num_bins


def one_hot_logits(bins: torch.Tensor, num_bins: int = K) -> torch.Tensor:
    """Logits whose softmax is exactly one-hot in float32 (exp(-1e4) underflows to 0)."""
    logits = torch.full((len(bins), num_bins), -1e4)
    logits[torch.arange(len(bins)), bins] = 0.0
    return logits


# -- Gaussian targets ------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,truncate", [(0.5, None), (2.0, None), (2.0, 8), (30.0, 3)])
def test_gaussian_targets_rows_sum_to_one(sigma, truncate):
    q = gaussian_targets(torch.tensor([0, 17, 500, K - 1]), sigma=sigma, truncate=truncate)
    assert q.shape == (4, K) and q.dtype == torch.float32
    assert_close(q.sum(-1), torch.ones(4))
    assert q.argmax(-1).tolist() == [0, 17, 500, K - 1]


def test_truncate_zeroes_the_tails():
    q = gaussian_targets(torch.tensor([100]), sigma=5.0, truncate=8)[0]
    assert (q[92:109] > 0).all()
    assert (q[:92] == 0).all() and (q[109:] == 0).all()
    # without truncation the same sigma leaves mass beyond 8 bins
    assert gaussian_targets(torch.tensor([100]), sigma=5.0)[0, 109:].sum() > 1e-3


# -- W1 and soft CE --------------------------------------------------------------------------
@pytest.mark.parametrize("target,shift", [(10, 1), (10, 7), (0, 500), (0, K - 1), (900, -900)])
def test_w1_of_one_hot_shift_is_shift_over_999(target, shift):
    logits = one_hot_logits(torch.tensor([target + shift]))
    w1 = coord_w1(logits, torch.tensor([target]), sigma=1e-4)
    assert_close(w1, torch.tensor(abs(shift) / (K - 1)))


def test_w1_is_mean_over_slots():
    logits = one_hot_logits(torch.tensor([3, 50]))
    w1 = coord_w1(logits, torch.tensor([0, 40]), sigma=1e-4)
    assert_close(w1, torch.tensor((3 + 10) / 2 / (K - 1)))


@pytest.mark.parametrize("loss_fn", [coord_soft_ce, coord_w1])
def test_loss_is_minimal_when_prediction_equals_target(loss_fn):
    targets = torch.tensor([5, 60, 120])
    sigma, num_bins = 10.0, 128  # wide enough that no target probability underflows to 0
    q = gaussian_targets(targets, sigma=sigma, num_bins=num_bins).double()
    best = q.log().requires_grad_()  # softmax(log q) = q
    loss = loss_fn(best, targets, sigma=sigma)
    loss.backward()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        noisy = best.detach() + 0.3 * torch.randn(best.shape, generator=gen, dtype=best.dtype)
        assert loss_fn(noisy, targets, sigma=sigma) > loss.detach()
    if loss_fn is coord_w1:
        assert_close(loss.detach(), torch.zeros((), dtype=torch.float64))
    else:  # the gradient softmax(s) - q vanishes at the optimum
        assert_close(best.grad, torch.zeros_like(best.grad))


def test_soft_ce_with_vanishing_sigma_equals_hard_ce():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, K, generator=gen)
    targets = torch.tensor([0, 1, 400, 998, K - 1, 77])
    soft = coord_soft_ce(logits, targets, sigma=1e-3)
    assert_close(soft, coord_hard_ce(logits, targets))
    assert_close(soft, F.cross_entropy(logits, targets))


def test_soft_ce_temperature_scales_logits():
    gen = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(4, 50, generator=gen), torch.tensor([1, 2, 3, 40])
    hot = coord_soft_ce(logits, targets, sigma=2.0, temperature=0.5)
    assert_close(hot, coord_soft_ce(logits * 2, targets, sigma=2.0))
    w1_hot = coord_w1(logits, targets, sigma=2.0, temperature=0.5)
    assert_close(w1_hot, coord_w1(logits * 2, targets, sigma=2.0))


def test_coord_hard_ce_equals_cross_entropy():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, K, generator=gen)
    targets = torch.randint(0, K, (9,), generator=gen)
    assert_close(coord_hard_ce(logits, targets), F.cross_entropy(logits, targets))


def test_losses_run_in_float32_for_bfloat16_logits():
    gen = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(4, K, generator=gen), torch.tensor([3, 30, 300, 900])
    half = logits.bfloat16()
    for fn in (coord_soft_ce, coord_w1):
        out = fn(half, targets, sigma=2.0, truncate=8)
        assert out.dtype == torch.float32
        assert_close(out, fn(half.float(), targets, sigma=2.0, truncate=8))


# -- gates -----------------------------------------------------------------------------------
def test_gate_is_zero_when_all_mass_is_on_coord_tokens():
    vocab_logits = torch.full((3, 20), -1e9)
    coord_ids = torch.tensor([4, 5, 6, 11])
    vocab_logits[:, coord_ids] = torch.randn(3, 4)
    assert_close(coord_gate(vocab_logits, coord_ids), torch.tensor(0.0))


def test_gates_equal_minus_log_of_coord_mass():
    gen = torch.Generator().manual_seed(5)
    vocab_logits, coord_ids = torch.randn(5, 30, generator=gen), torch.tensor([0, 3, 7, 8, 29])
    tau = 0.7
    mass = torch.softmax(vocab_logits / tau, -1)[:, coord_ids].sum(-1)  # [N]
    assert_close(coord_gate(vocab_logits, coord_ids, temperature=tau), -mass.log().mean())
    expected_text = -(1 - mass + 1e-6).log().mean()
    assert_close(text_gate(vocab_logits, coord_ids, temperature=tau), expected_text)


def test_lean_gates_take_coord_slice_and_vocab_lse():
    gen = torch.Generator().manual_seed(6)
    vocab_logits, coord_ids = torch.randn(4, 25, generator=gen), torch.tensor([2, 9, 10])
    lse = (vocab_logits / 2.0).logsumexp(-1)
    coord_logits = vocab_logits[:, coord_ids]
    lean = coord_gate_from_lse(coord_logits, lse, temperature=2.0)
    assert_close(lean, coord_gate(vocab_logits, coord_ids, temperature=2.0))
    lean_text = text_gate_from_lse(coord_logits, lse, temperature=2.0)
    assert_close(lean_text, text_gate(vocab_logits, coord_ids, temperature=2.0))


def test_text_gate_is_finite_when_all_mass_is_on_coord_tokens():
    vocab_logits = torch.full((2, 10), -1e9)
    vocab_logits[:, :3] = 0.0
    assert torch.isfinite(text_gate(vocab_logits, torch.arange(3)))


# -- weighting -------------------------------------------------------------------------------
def test_weighted_mean_is_sum_of_weighted_values_over_weight_sum():
    values, weights = torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([1.0, 0.5, 0.0, 2.0])
    assert_close(weighted_mean(values, weights), torch.tensor((1 + 1 + 16) / 3.5))


def test_weighted_mean_without_weight_is_zero_with_graph():
    values = torch.randn(3, requires_grad=True)
    loss = weighted_mean(values, torch.zeros(3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert_close(values.grad, torch.zeros_like(values))
    assert weighted_mean(torch.ones(0), torch.ones(0)).item() == 0.0


# -- box losses ------------------------------------------------------------------------------
def test_ciou_of_identical_boxes_is_one():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.31, 0.6]])
    assert_close(bbox_ciou(boxes, boxes), torch.tensor(0.0))


@pytest.mark.parametrize(
    "pred",
    [
        [0.4, 0.4, 0.4, 0.4],  # zero area
        [0.4, 0.1, 0.4, 0.9],  # zero width
        [0.8, 0.9, 0.2, 0.1],  # flipped on both axes
        [-0.5, 1.2, 1.5, -0.3],  # flipped and outside the image
        [0.3, 0.3, 0.3, 0.3],  # zero area, identical to a zero-area GT
    ],
)
def test_ciou_loss_is_finite_for_degenerate_and_flipped_boxes(pred):
    pred = torch.tensor([pred], requires_grad=True)
    for gt in ([[0.2, 0.1, 0.6, 0.5]], [[0.3, 0.3, 0.3, 0.3]]):
        loss = bbox_ciou(pred, torch.tensor(gt))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
        assert 0.0 <= loss.item() <= 2.5


def test_ciou_canonicalises_flipped_predictions():
    gt = torch.tensor([[0.2, 0.1, 0.6, 0.5]])
    flipped = torch.tensor([[0.7, 0.6, 0.3, 0.2]])
    assert_close(bbox_ciou(flipped, gt), bbox_ciou(torch.tensor([[0.3, 0.2, 0.7, 0.6]]), gt))


def test_bbox_smoothl1_equals_torch():
    gen = torch.Generator().manual_seed(9)
    pred, gt = torch.rand(5, 4, generator=gen), torch.rand(5, 4, generator=gen)
    assert_close(bbox_smoothl1(pred, gt), F.smooth_l1_loss(pred, gt))


# -- gradients -------------------------------------------------------------------------------
def _double(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("loss_fn", [coord_soft_ce, coord_w1])
@pytest.mark.parametrize("truncate,temperature", [(None, 1.0), (4, 0.7)])
def test_gradcheck_coord_distribution_losses(loss_fn, truncate, temperature):
    targets = torch.tensor([0, 7, 15])
    logits = _double(3, 16)
    fn = lambda s: loss_fn(s, targets, sigma=1.5, truncate=truncate, temperature=temperature)
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("gate_fn", [coord_gate, text_gate])
def test_gradcheck_gates(gate_fn):
    coord_ids = torch.tensor([1, 4, 5, 9])
    logits = _double(3, 12, seed=1)
    assert torch.autograd.gradcheck(lambda z: gate_fn(z, coord_ids, temperature=0.8), (logits,))


def test_gradcheck_ciou():
    gen = torch.Generator().manual_seed(2)
    lo = torch.rand(4, 2, generator=gen, dtype=torch.float64) * 0.5
    pred = torch.cat([lo, lo + 0.1 + 0.4 * torch.rand(4, 2, generator=gen, dtype=torch.float64)], 1)
    gt = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.0, 0.9, 0.4]] * 2, dtype=torch.float64)
    pred[1] = pred[1][[2, 3, 0, 1]]  # a flipped prediction takes the canonicalisation path
    assert torch.autograd.gradcheck(lambda p: bbox_ciou(p, gt), (pred.requires_grad_(),))


# -- empty inputs ----------------------------------------------------------------------------
EMPTY_CASES = {
    "soft_ce": lambda s: coord_soft_ce(s, torch.zeros(0, dtype=torch.long), sigma=2.0),
    "w1": lambda s: coord_w1(s, torch.zeros(0, dtype=torch.long), sigma=2.0),
    "hard_ce": lambda s: coord_hard_ce(s, torch.zeros(0, dtype=torch.long)),
    "gate": lambda s: coord_gate(s, torch.tensor([0, 1])),
    "text_gate": lambda s: text_gate(s, torch.tensor([0, 1])),
    "smoothl1": lambda s: bbox_smoothl1(s[:, :4], s[:, :4].detach()),
    "ciou": lambda s: bbox_ciou(s[:, :4], s[:, :4].detach()),
}


@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_empty_input_gives_zero_that_keeps_the_graph(name):
    logits = torch.zeros(0, K, requires_grad=True)
    loss = EMPTY_CASES[name](logits)
    assert loss.shape == () and loss.item() == 0.0 and not math.isnan(loss.item())
    assert loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, K)
