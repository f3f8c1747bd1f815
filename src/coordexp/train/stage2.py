"""The Stage-2 AB step (reference section 4): the schedule picks Channel A or Channel B for each
optimizer step; either channel turns records into one weighted loss plus (sum, count) stats.
This module holds the two pipelines; their pieces live in `channel_a` (the soft self-context
passes), `channel_b` (rollout targets) and `terms` (the loss terms and their one weighting).

Channel A: n soft self-context passes; token CE (struct + desc) on A1, the struct CE on the
final pass weighted by fmt_struct_ce_weight, and coord / box / text-gate terms and coord_diag
on the final pass. Channel B: rollout -> parse -> match -> targets -> one forward -> the same
terms on the supervised tokens.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from coordexp.config import Config
from coordexp.data.collate import Batch, Collator
from coordexp.data.records import Record
from coordexp.lmhead import HiddenHead, Rows
from coordexp.losses import weighted_mean
from coordexp.model.adapter import hidden_states, lm_head_weight
from coordexp.rollout import generate_rollouts
from coordexp.train.channel_a import soft_context_forward
from coordexp.train.channel_b import build_target, encode_targets, rollout_stats
from coordexp.train.schedule import is_channel_b, schedule_stats
from coordexp.train.stage1 import pack_step_batch
from coordexp.train.terms import (
    StepOutput,
    mean_stat,
    objective_weights,
    slot_rows,
    slot_terms,
    stat,
    step_lse,
    text_ce,
    text_gate_term,
    text_rows,
    weighted_total,
)


def channel_a_step(model, batch: Batch, cfg: Config, coord_ids: Tensor) -> StepOutput:
    """n soft self-context passes -> A1 token CE (+ the final pass's struct CE) -> coord, box
    and text-gate terms on the final pass -> the weighted total."""
    s, c = cfg.stage2_ab, cfg.coord_soft_ce_w1
    if s.n_softctx_iter == 1:  # n > 1 keeps padded rows: its shared prefix starts at 0
        batch, _ = pack_step_batch(model, batch, cfg)
    passes = soft_context_forward(model, batch, coord_ids, s)
    first, final = passes.first, passes.final
    self_context = final is not first  # n > 1 and there are coord slots to feed back
    text, is_struct = text_rows(batch)
    struct, desc, slots = text[is_struct], text[~is_struct], slot_rows(batch)
    ce_sets = [(first, text), (final, struct)] if self_context else [(first, text)]
    (first_lse, *final_lse), slot_lse = step_lse(ce_sets, (final, slots), c.temperature)
    ce_first = text_ce(first, batch, text, first_lse)  # [M]
    anchor = weighted_mean(ce_first, torch.where(is_struct, 1.0, s.desc_ce_weight))
    stats = {"loss/token_ce_anchor": stat(anchor, len(text)),
             "loss/struct_ce": mean_stat(ce_first, is_struct),
             "loss/desc_ce": mean_stat(ce_first, ~is_struct)}
    terms, diag = slot_terms(final, slots, batch.coord_bins, slot_lse, c, s.coord_decode_mode,
                             s.softctx_temperature)
    if self_context:  # the struct / end-of-turn stabiliser reads the final pass's struct rows
        ce_final = text_ce(final, batch, struct, final_lse[0])
        self_ce = weighted_mean(ce_final, torch.ones_like(ce_final))
        stats["loss/token_ce_self_context"] = stat(self_ce, len(struct))
        token_ce = anchor + s.fmt_struct_ce_weight * self_ce
        terms["loss/text_gate"] = text_gate_term(final, struct, final_lse[0], desc, cfg)
    else:
        token_ce = anchor
        terms["loss/text_gate"] = text_gate_term(final, text, first_lse, _none_like(text), cfg)
    loss, term_stats = weighted_total(token_ce, terms, objective_weights(cfg, "stage2_ab"),
                                      num_slots=len(slots), num_text=len(text))
    return StepOutput(loss, stats | term_stats | diag)


def channel_b_step(model, collator: Collator, records: list[Record], cfg: Config,
                   coord_ids: Tensor, seed: int) -> StepOutput:
    """Rollout -> parse -> match -> targets -> one teacher-forced forward -> the same terms."""
    s, c = cfg.stage2_ab, cfg.coord_soft_ce_w1
    started = time.perf_counter()
    rollouts = generate_rollouts(model, collator.processor, records, cfg.rollout, progress=False,
                                 seed=seed, field_order=cfg.data.field_order)
    seconds = time.perf_counter() - started
    targets = [build_target(r, rec, collator, cfg) for r, rec in zip(rollouts, records,
                                                                       strict=True)]
    batch, weights = encode_targets(collator, records, targets)
    batch, weights = batch.to(coord_ids.device), weights.to(coord_ids.device)
    batch, layout = pack_step_batch(model, batch, cfg)
    if layout is not None:
        weights = layout.pack(weights, 0.0)
    head = HiddenHead(hidden_states(model, batch.inputs), lm_head_weight(model), coord_ids)
    text, is_struct = text_rows(batch)
    slots = slot_rows(batch)
    (text_lse,), slot_lse = step_lse([(head, text)], (head, slots), c.temperature)
    ce = text_ce(head, batch, text, text_lse)  # [M]
    token_ce = weighted_mean(ce, weights[text.b, text.t])
    terms, diag = slot_terms(head, slots, batch.coord_bins, slot_lse, c, s.coord_decode_mode,
                             s.softctx_temperature)
    terms["loss/text_gate"] = text_gate_term(head, text, text_lse, _none_like(text), cfg)
    loss, term_stats = weighted_total(token_ce, terms, objective_weights(cfg, "stage2_ab"),
                                      num_slots=len(slots), num_text=len(text))
    stats = {"loss/struct_ce": mean_stat(ce, is_struct), "loss/desc_ce": mean_stat(ce, ~is_struct)}
    return StepOutput(loss, stats | term_stats | diag | rollout_stats(targets, seconds))


def _none_like(rows: Rows) -> Rows:
    return rows[torch.zeros(len(rows), dtype=torch.bool, device=rows.b.device)]


def rollout_seed(seed: int, step: int, index: int) -> int:
    """A positive 31-bit seed per (training seed, optimizer step, rank x micro-batch)."""
    return ((seed + step * 1_000_003 + index * 7_919) & 0x7FFFFFFF) or 1


class Stage2Step:
    """step_fn(records, optimizer_step) -> StepOutput for the training loop."""

    def __init__(self, model, collator: Collator, cfg: Config, coord_ids: Tensor):
        self.model, self.collator, self.cfg = model, collator, cfg
        self.device = next(model.parameters()).device
        self.coord_ids = coord_ids.to(self.device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.gas = cfg.gradient_accumulation_steps(world)
        self.last_step, self.micro = -1, 0  # micro-batch index within the current step

    def __call__(self, records: list[Record], optimizer_step: int) -> StepOutput:
        self.micro = self.micro + 1 if optimizer_step == self.last_step else 0
        self.last_step = optimizer_step
        b_ratio = self.cfg.stage2_ab.schedule.b_ratio
        if is_channel_b(optimizer_step, b_ratio):
            seed = rollout_seed(self.cfg.training.seed, optimizer_step,
                                self.rank * self.gas + self.micro)
            out = channel_b_step(self.model, self.collator, records, self.cfg, self.coord_ids,
                                 seed)
        else:
            batch = self.collator(records).to(self.device)
            out = channel_a_step(self.model, batch, self.cfg, self.coord_ids)
        out.stats |= schedule_stats(optimizer_step, b_ratio)
        return out

