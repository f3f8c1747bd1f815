"""The memory-lean LM-head path gives the naive full-logits losses and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from coordexp.decode import expected_coord
from coordexp.lmhead import coord_slice_logits, label_logits, vocab_logsumexp
from coordexp.losses import (
    bbox_ciou,
    coord_gate,
    coord_gate_from_lse,
    coord_soft_ce,
    coord_w1,
    text_gate,
    text_gate_from_lse,
    weighted_mean,
)

T, D, V, K = 40, 16, 301, 24  # rows, hidden, vocab, coord bins (coord ids are not contiguous)


def make_case(seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen, dtype=dtype).requires_grad_()
    coord_ids = torch.randperm(V, generator=gen)[:K].sort().values
    rows = torch.randperm(T, generator=gen)
    coord_rows, text_rows = rows[:8].sort().values, rows[8:30].sort().values  # 2 boxes
    coord_targets = torch.randint(0, K, (8,), generator=gen)
    text_labels = torch.randint(0, V, (22,), generator=gen)
    text_weights = torch.rand(22, generator=gen, dtype=dtype)
    return h, weight, coord_ids, coord_rows, coord_targets, text_rows, text_labels, text_weights


def coord_terms(coord_logits, targets, tau):
    boxes = expected_coord(coord_logits, tau).reshape(-1, 4)  # [N/4, 4]
    gt = (targets.reshape(-1, 4) / (K - 1)).to(boxes.dtype)
    return {
        "soft_ce": coord_soft_ce(coord_logits, targets, sigma=2.0, truncate=5, temperature=tau),
        "w1": coord_w1(coord_logits, targets, sigma=2.0, truncate=5, temperature=tau),
        "ciou": bbox_ciou(boxes, gt),
    }


def naive_terms(h, weight, coord_ids, coord_rows, targets, text_rows, labels, weights, tau):
    logits = h @ weight.T  # [T, V] -- what the lean path never builds
    terms = coord_terms(logits[coord_rows][:, coord_ids], targets, tau)
    terms["gate"] = coord_gate(logits[coord_rows], coord_ids, temperature=tau)
    terms["text_gate"] = text_gate(logits[text_rows], coord_ids, temperature=tau)
    ce = F.cross_entropy(logits[text_rows], labels, reduction="none")  # [M]
    terms["token_ce"] = (weights * ce).sum() / weights.sum()
    return terms


def lean_terms(h, weight, coord_ids, coord_rows, targets, text_rows, labels, weights, tau):
    h_coord, h_text = h[coord_rows], h[text_rows]  # [N, D], [M, D]
    coord_logits = coord_slice_logits(h_coord, weight, coord_ids)  # [N, K]
    terms = coord_terms(coord_logits, targets, tau)
    lse_coord = vocab_logsumexp(h_coord, weight, temperature=tau, chunk_size=64)  # [N]
    terms["gate"] = coord_gate_from_lse(coord_logits, lse_coord, temperature=tau)
    text_coord_logits = coord_slice_logits(h_text, weight, coord_ids)  # [M, K]
    lse_text_tau = vocab_logsumexp(h_text, weight, temperature=tau, chunk_size=64)
    terms["text_gate"] = text_gate_from_lse(text_coord_logits, lse_text_tau, temperature=tau)
    lse_text = vocab_logsumexp(h_text, weight, chunk_size=64)  # CE has no temperature
    terms["token_ce"] = weighted_mean(lse_text - label_logits(h_text, weight, labels), weights)
    return terms


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_lean_path_matches_naive_losses_and_gradients(tau):
    case = make_case()
    h, weight = case[:2]
    naive = naive_terms(*case, tau)
    lean = lean_terms(*case, tau)
    for name in naive:
        assert_close(lean[name], naive[name], msg=name)
        grads_naive = torch.autograd.grad(naive[name], (h, weight), retain_graph=True)
        grads_lean = torch.autograd.grad(lean[name], (h, weight), retain_graph=True)
        assert_close(grads_lean[0], grads_naive[0], msg=f"{name} d/dh")
        assert_close(grads_lean[1], grads_naive[1], msg=f"{name} d/dW")


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 300, 301, 4096])
def test_vocab_logsumexp_matches_logsumexp_for_any_chunking(chunk_size):
    h, weight = make_case(1)[:2]  # float64: 301 one-column chunks reorder float32 sums
    lse = vocab_logsumexp(h, weight, temperature=0.5, chunk_size=chunk_size)
    expected = (h @ weight.T / 0.5).logsumexp(-1)
    assert_close(lse, expected)
    g = torch.randn(T, dtype=torch.float64)
    assert_close(
        torch.autograd.grad(lse, (h, weight), g), torch.autograd.grad(expected, (h, weight), g)
    )


def test_gradcheck_vocab_logsumexp():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: vocab_logsumexp(a, b, temperature=0.8, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (h, weight))


def test_backward_never_keeps_rows_by_vocab():
    h, weight = make_case(3, torch.float32)[:2]
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lse = vocab_logsumexp(h, weight, chunk_size=32)
    assert saved and max(saved) <= max(h.numel(), weight.numel()) < T * V
    lse.sum().backward()
    assert h.grad is not None and weight.grad is not None


def test_frozen_head_gets_no_gradient_and_half_inputs_keep_their_dtype():
    h, weight = make_case(4, torch.float32)[:2]
    h16 = h.detach().bfloat16().requires_grad_()
    frozen = weight.detach().bfloat16()
    lse = vocab_logsumexp(h16, frozen, chunk_size=50)
    assert lse.dtype == torch.float32
    assert_close(lse, (h16.float() @ frozen.float().T).logsumexp(-1))
    lse.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and frozen.grad is None


def test_helpers_give_the_columns_of_the_full_logits():
    h, weight, coord_ids = make_case(5, torch.float32)[:3]
    full = h.float() @ weight.float().T  # [T, V]
    assert full.shape == (T, V) and full.dtype == torch.float32
    assert_close(coord_slice_logits(h, weight, coord_ids), full[:, coord_ids])
    labels = torch.arange(T) * 7 % V
    assert_close(label_logits(h, weight, labels), full[torch.arange(T), labels])


def test_empty_rows_give_empty_outputs_with_graph():
    h, weight, coord_ids = make_case(6, torch.float32)[:3]
    empty = h[:0]
    lse = vocab_logsumexp(empty, weight)
    coord_logits = coord_slice_logits(empty, weight, coord_ids)
    assert lse.shape == (0,) and coord_logits.shape == (0, K)
    gate = coord_gate_from_lse(coord_logits, lse)
    assert gate.item() == 0.0 and gate.requires_grad
    gate.backward()
