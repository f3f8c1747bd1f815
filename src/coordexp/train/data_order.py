"""Deterministic, resumable data order: a seeded permutation per epoch, split over ranks; with
static packing, a permutation of the pack plan's packs (one packed row per micro-step)."""

from __future__ import annotations

import torch

from coordexp.config import TrainingConfig
from coordexp.data.packing import plan_digest, plan_packs
from coordexp.errors import UserError


class DataOrder:
    """Each micro-step takes the next per_device x world units of the epoch's permutation;
    rank r gets its contiguous slice. An epoch's tail shorter than that is skipped. A unit is
    a sample, or with `packs` a pack (the sample indices of one packed row)."""

    def __init__(self, n: int, seed: int, per_device: int, rank: int = 0, world: int = 1,
                 packs: list[list[int]] | None = None):
        self.packs = packs
        self.n = n if packs is None else len(packs)
        self.seed, self.per_device, self.rank, self.world = seed, per_device, rank, world
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_indices(self) -> list[int]:
        """Sample indices of this rank's next micro-step (a pack's, in its order, if packed)."""
        units = self._next_units()
        return units if self.packs is None else [i for u in units for i in self.packs[u]]

    def _next_units(self) -> list[int]:
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
        state = {"epoch": self.epoch, "pos": self.pos}
        return state if self.packs is None else state | {"pack_plan": plan_digest(self.packs)}

    def load_state_dict(self, state: dict) -> None:
        plan = None if self.packs is None else plan_digest(self.packs)
        if state.get("pack_plan") != plan:
            raise UserError(f"the checkpoint's pack plan ({state.get('pack_plan')}) is not this "
                            f"run's ({plan}): resume with the data and training.packing* keys "
                            "the checkpoint was trained with")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


def build_data_order(t: TrainingConfig, records, collator, rank: int = 0,
                     world: int = 1) -> DataOrder:
    """The run's data order; with static packing the plan is computed here, once, from every
    record's encoded length (image size and answer tokens, no image is read)."""
    if t.packing == "none":
        return DataOrder(len(records), t.seed, t.per_device_batch_size, rank, world)
    lengths = [collator.sample_length(r) for r in records]
    packs = plan_packs(lengths, t.packing_length, allow_single_long=t.packing_allow_single_long,
                       names=[f"training record {i + 1} ({r.image})"
                              for i, r in enumerate(records)])
    return DataOrder(len(records), t.seed, 1, rank, world, packs=packs)
