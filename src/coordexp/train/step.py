"""What a stage's step function returns, and how its statistics are written.

A statistic is a float64 pair (sum, count), detached; micro-batches and ranks add pairs, and
the logged value is sum / count, formed only at log time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class StepOutput:
    loss: Tensor  # weighted total of one micro-batch (scalar, with graph)
    stats: dict[str, Tensor] = field(default_factory=dict)  # name -> [2] (sum, count)


def stat(mean: Tensor | float, count: Tensor | float) -> Tensor:
    """A (mean x count, count) pair: the mean of `count` items, weighted by that count."""
    mean = torch.as_tensor(mean, dtype=torch.float64).detach()  # floats stay float64
    count = torch.as_tensor(count, dtype=torch.float64)
    return torch.stack([mean * count, count]).reshape(2)


def add_stats(total: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    for key, pair in new.items():
        total[key] = total[key] + pair if key in total else pair.clone()
    return total
