"""The Stage-2 AB channel schedule: exact, deterministic, and in the right long-run ratio."""

from math import floor

import pytest

from coordexp.diagnostics import finalize_stats
from coordexp.train.schedule import (
    REALIZED_WINDOW,
    b_steps_before,
    is_channel_b,
    realized_b_ratio,
    schedule_stats,
)


def channels(b_ratio: float, steps: int) -> str:
    return "".join("B" if is_channel_b(s, b_ratio) else "A" for s in range(steps))


def test_half_alternates_starting_with_a():
    assert channels(0.5, 6) == "ABABAB"


@pytest.mark.parametrize(("b_ratio", "expected"), [(0.0, "AAAAAAAA"), (1.0, "BBBBBBBB"),
                                                   (0.25, "AAABAAAB"), (0.85, "ABBBBBAB")])
def test_small_prefixes(b_ratio, expected):
    assert channels(b_ratio, 8) == expected


@pytest.mark.parametrize("b_ratio", [0.05, 0.1, 0.29, 1 / 3, 0.5, 0.85, 0.999])
def test_long_run_ratio_and_every_window_within_one_step(b_ratio):
    seq = [is_channel_b(s, b_ratio) for s in range(5000)]
    assert sum(seq) == b_steps_before(5000, b_ratio)
    assert abs(sum(seq) - 5000 * b_ratio) < 1
    for width in (7, 50, 200):
        counts = {sum(seq[i:i + width]) for i in range(0, 5000 - width, 13)}
        assert counts <= {floor(width * b_ratio), floor(width * b_ratio) + 1}


def test_decimal_ratios_do_not_suffer_float_rounding():
    # 100 * 0.29 is 28.999999999999996 in floats; the schedule counts 29 B steps.
    assert b_steps_before(100, 0.29) == 29
    assert channels(0.85, 20).count("B") == 17


def test_realized_ratio_counts_the_last_window():
    b_ratio = 0.3
    for step in (0, 5, 199, 200, 777):
        first = max(0, step + 1 - REALIZED_WINDOW)
        window = [is_channel_b(s, b_ratio) for s in range(first, step + 1)]
        assert realized_b_ratio(step, b_ratio) == pytest.approx(sum(window) / len(window))


def test_schedule_stats_are_pairs_that_survive_aggregation():
    stats = [schedule_stats(3, 0.5) for _ in range(4)]  # four micro-batches of a B step
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    values = finalize_stats(total)
    assert values["stage2/channel_b"] == 1.0 and values["stage2/channel_a"] == 0.0
    assert values["stage2_ab/b_ratio_realized"] == pytest.approx(0.5)
