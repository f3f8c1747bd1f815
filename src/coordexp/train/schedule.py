"""The Stage-2 AB channel schedule: which channel an optimizer step runs, from the step alone.

Step s runs Channel B iff floor((s + 1) r) > floor(s r) for b_ratio r (Bresenham), so any
window of steps holds B steps in proportion r up to one step. The decision depends only on
the step and the config: every rank and every micro-batch of an accumulation window agree
without communication, and a resumed run continues the same sequence.
"""

from __future__ import annotations

from fractions import Fraction
from math import floor

import torch

from coordexp.train.terms import stat

REALIZED_WINDOW = 200  # optimizer steps over which stage2_ab/b_ratio_realized is measured


def _exact(b_ratio: float) -> Fraction:
    """The ratio as the decimal the user wrote (0.85 -> 17/20), so steps never depend on
    float rounding of s * b_ratio."""
    return Fraction(repr(float(b_ratio)))


def b_steps_before(step: int, b_ratio: float) -> int:
    """How many of the steps 0..step-1 run Channel B."""
    return floor(step * _exact(b_ratio))


def is_channel_b(step: int, b_ratio: float) -> bool:
    return b_steps_before(step + 1, b_ratio) > b_steps_before(step, b_ratio)


def realized_b_ratio(step: int, b_ratio: float, window: int = REALIZED_WINDOW) -> float:
    """Fraction of Channel-B steps among the last `window` steps up to and including `step`."""
    first = max(0, step + 1 - window)
    return (b_steps_before(step + 1, b_ratio) - b_steps_before(first, b_ratio)) / (step + 1 - first)


def schedule_stats(step: int, b_ratio: float) -> dict[str, torch.Tensor]:
    """stage2/channel_a, stage2/channel_b (1 or 0 per micro-batch) and the realized ratio."""
    b = float(is_channel_b(step, b_ratio))
    realized = torch.tensor(realized_b_ratio(step, b_ratio), dtype=torch.float64)
    return {"stage2/channel_a": stat(1.0 - b, 1), "stage2/channel_b": stat(b, 1),
            "stage2_ab/b_ratio_realized": stat(realized, 1)}
