"""coord_diag sums and counts, their aggregation, and the rollout statistics of the report."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from coordexp.diagnostics import (
    coord_diag,
    finalize_stats,
    near_duplicate_pairs,
    ordering_violations,
)

SLOT_KEYS = {
    "coord_diag/p_gt_mean",
    "coord_diag/acc_top5",
    "coord_diag/margin_mean",
    "coord_diag/expected_bin_mae",
    "coord_diag/expected_bin_abs_err_p90",
    "coord_diag/coord_tokens",
}
MASS = "coord_diag/coord_vocab_mass_mean"


def add_stats(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def test_values_on_hand_built_logits():
    logits = torch.full((2, 10), -1e4)
    logits[0, 3] = 0.0  # slot 0: one-hot on the target bin 3
    logits[1, :6] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # target 9 is outside the top 5
    stats = coord_diag(logits, torch.tensor([3, 9]))
    assert set(stats) == SLOT_KEYS
    for pair in stats.values():
        assert pair.shape == (2,) and pair.dtype == torch.float64 and not pair.requires_grad
    p = torch.softmax(logits[1].double(), -1)
    err1 = abs((p * torch.arange(10)).sum().item() - 9)
    out = finalize_stats(stats)
    assert out["coord_diag/coord_tokens"] == 2
    assert out["coord_diag/acc_top5"] == 0.5
    assert out["coord_diag/p_gt_mean"] == pytest.approx(0.5, abs=1e-6)
    assert out["coord_diag/margin_mean"] == pytest.approx((0 + 5 + 1e4) / 2)
    assert out["coord_diag/expected_bin_mae"] == pytest.approx(err1 / 2, rel=1e-5)
    p90 = torch.quantile(torch.tensor([0.0, err1]), 0.9).item()
    assert out["coord_diag/expected_bin_abs_err_p90"] == pytest.approx(p90, rel=1e-5)


def test_temperature_sharpens_the_distribution():
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(8, 50, generator=gen), torch.randint(0, 50, (8,), generator=gen)
    cold = finalize_stats(coord_diag(logits, targets, temperature=0.5))
    sharp = finalize_stats(coord_diag(logits * 2, targets))
    for key in cold:
        assert cold[key] == pytest.approx(sharp[key], rel=1e-5)


def test_micro_batches_aggregate_by_summing():
    gen = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(12, 40, generator=gen), torch.randint(0, 40, (12,), generator=gen)
    whole = finalize_stats(coord_diag(logits, targets))
    parts = add_stats(coord_diag(logits[:5], targets[:5]), coord_diag(logits[5:], targets[5:]))
    split = finalize_stats(parts)
    for key in SLOT_KEYS - {"coord_diag/expected_bin_abs_err_p90", "coord_diag/coord_tokens"}:
        assert split[key] == pytest.approx(whole[key], rel=1e-6)
    assert parts["coord_diag/coord_tokens"].tolist() == [12.0, 2.0]  # (slots, calls)
    assert parts["coord_diag/expected_bin_abs_err_p90"][1].item() == 2.0


def test_vocab_mass_from_lse_equals_from_full_logits():
    gen = torch.Generator().manual_seed(2)
    vocab_logits = torch.randn(6, 90, generator=gen)
    coord_ids = torch.arange(30, 60)
    targets = torch.randint(0, 30, (6,), generator=gen)
    tau = 0.8
    coord_logits = vocab_logits[:, coord_ids]
    lse = (vocab_logits / tau).logsumexp(-1)
    from_lse = coord_diag(coord_logits, targets, vocab_lse=lse, temperature=tau)
    from_logits = coord_diag(
        coord_logits, targets, vocab_logits=vocab_logits, coord_ids=coord_ids, temperature=tau
    )
    expected = torch.softmax(vocab_logits / tau, -1)[:, coord_ids].sum(-1).mean()
    assert finalize_stats(from_lse)[MASS] == pytest.approx(expected.item(), rel=1e-5)
    assert_close(from_lse[MASS], from_logits[MASS])
    assert MASS not in coord_diag(coord_logits, targets)


def test_empty_slots_contribute_counts_of_zero():
    stats = coord_diag(
        torch.zeros(0, 20), torch.zeros(0, dtype=torch.long), vocab_lse=torch.zeros(0)
    )
    assert set(stats) == SLOT_KEYS | {MASS}
    assert finalize_stats(stats) == {"coord_diag/coord_tokens": 0.0}


def test_near_duplicate_pairs_need_same_desc_and_high_iou():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 11], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]]
    descs = ["book", "book", "cup", "book", "book"]
    # book pairs: (0,1) iou 10/11, (0,4) 1.0, (1,4) 10/11; (0,3) disjoint; the cup never counts
    assert near_duplicate_pairs(boxes, descs, 0.9) == 3
    assert near_duplicate_pairs(boxes, descs, 0.95) == 1
    assert near_duplicate_pairs(boxes[:1], descs[:1], 0.5) == 0
    assert near_duplicate_pairs([], [], 0.5) == 0


def test_ordering_violations_count_adjacent_anchor_decreases():
    assert ordering_violations([]) == 0
    assert ordering_violations([[0, 0, 1, 1], [5, 0, 6, 1], [0, 3, 1, 4]]) == 0
    # second object: same y1, smaller x1 -> violation; third: smaller y1 -> violation
    assert ordering_violations([[5, 3, 9, 9], [2, 3, 9, 9], [9, 1, 10, 2], [0, 8, 1, 9]]) == 2
