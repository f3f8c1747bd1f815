"""The Stage-1 step: one teacher-forced forward, token CE on non-coord tokens plus the CoordExp
coordinate terms (soft CE, W1, gate, optional hard CE) and optional box losses on the
expectation decode. LM-head logits are computed only where a loss reads them."""

from __future__ import annotations

import torch
from torch import Tensor

from coordexp.config import Config
from coordexp.data.collate import COORD, DESC, STRUCT, Batch
from coordexp.data.packing import Layout
from coordexp.lmhead import HiddenHead
from coordexp.losses import weighted_mean
from coordexp.model.adapter import hidden_states, lm_head_weight, pack_rows
from coordexp.train.terms import (
    StepOutput,
    objective_weights,
    slot_rows,
    slot_terms,
    stat,
    step_lse,
    text_ce,
    typed_rows,
    weighted_total,
)


def pack_step_batch(model, batch: Batch, cfg: Config) -> tuple[Batch, Layout | None]:
    """With training.packing=static, the micro-step's samples as packed rows (a pack of the
    plan fills one row); otherwise the padded batch as it is."""
    if cfg.training.packing == "none":
        return batch, None
    return pack_rows(model, batch, cfg.training.packing_length)


def stage1_step(model, batch: Batch, cfg: Config, coord_ids: Tensor) -> StepOutput:
    c = cfg.coord_soft_ce_w1
    batch, _ = pack_step_batch(model, batch, cfg)
    head = HiddenHead(hidden_states(model, batch.inputs), lm_head_weight(model), coord_ids)
    if not c.enabled:  # the pure-CE ablation: coord tokens stay in the full-vocabulary CE
        rows = typed_rows(batch, (STRUCT, DESC, COORD))
        ce = text_ce(head, batch, rows, head.vocab_lse(rows))
        token_ce = weighted_mean(ce, torch.ones_like(ce))
        return StepOutput(token_ce, {"loss/token_ce": stat(token_ce, 1), "loss": stat(token_ce, 1)})
    text, slots = typed_rows(batch, (STRUCT, DESC)), slot_rows(batch)
    (text_lse,), slot_lse = step_lse([(head, text)], (head, slots), c.temperature)
    ce = text_ce(head, batch, text, text_lse)  # [M]
    terms, diag = slot_terms(head, slots, batch.coord_bins, slot_lse, c, "exp", c.temperature)
    loss, stats = weighted_total(weighted_mean(ce, torch.ones_like(ce)), terms,
                                 objective_weights(cfg, "stage1"), num_slots=len(slots),
                                 num_text=len(text))
    return StepOutput(loss, stats | diag)
