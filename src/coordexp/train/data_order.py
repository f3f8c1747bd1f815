"""Deterministic, resumable data order: a seeded permutation per epoch, split over ranks."""

from __future__ import annotations

import torch


class DataOrder:
    """Each micro-step takes the next per_device x world indices of the epoch's permutation;
    rank r gets its contiguous slice. An epoch's tail shorter than that is skipped."""

    def __init__(self, n: int, seed: int, per_device: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.per_device, self.rank, self.world = n, seed, per_device, rank, world
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_indices(self) -> list[int]:
        span = self.per_device * self.world
        if self.pos + span > self.n:
            if span > self.n:  # tiny datasets: sample with wrap-around
                idx = [(self.pos + i) % self.n for i in range(span)]
                self.pos = (self.pos + span) % self.n
                return idx[self.rank * self.per_device:(self.rank + 1) * self.per_device]
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        chunk = self._perm[self.pos:self.pos + span]
        self.pos += span
        return chunk[self.rank * self.per_device:(self.rank + 1) * self.per_device]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()
