"""The Stage-2 AB step (reference section 4): the schedule picks Channel A or Channel B for each
optimizer step; either channel turns records into one weighted loss plus (sum, count) stats.

Channel A: n soft self-context passes; token CE (struct + desc) on A1, the struct CE on the
final pass weighted by fmt_struct_ce_weight, and coord / box / text-gate terms and coord_diag
on the final pass. Channel B: rollout -> parse -> match -> targets -> one forward -> the same
terms on the supervised tokens. Every Stage-2 weight is read in `objective_weights` only.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from coordexp.config import Config
from coordexp.data.collate import DESC, STRUCT, Batch, Collator
from coordexp.data.records import Record
from coordexp.diagnostics import coord_diag
from coordexp.losses import text_gate_from_lse, weighted_mean
from coordexp.model.adapter import hidden_states, lm_head_weight
from coordexp.rollout import generate_rollouts
from coordexp.train.channel_a import HiddenHead, LogitsHead, soft_context_forward
from coordexp.train.channel_b import build_target, encode_targets, rollout_stats
from coordexp.train.schedule import is_channel_b, schedule_stats
from coordexp.train.stage1 import coord_terms
from coordexp.train.step import StepOutput, stat

Head = HiddenHead | LogitsHead
COORD_REG = ("loss/coord_token_ce", "loss/coord_soft_ce", "loss/coord_w1", "loss/coord_gate",
             "loss/text_gate")
GEO = ("loss/bbox_smoothl1", "loss/bbox_ciou")


def objective_weights(cfg: Config) -> dict[str, float]:
    """The weight of every coord / box term. Soft CE and W1 (with their temperature, sigma
    and truncation) come from coord_soft_ce_w1 (zero when it is disabled); the hard coord CE,
    the gates and the box losses from stage2_ab."""
    c, s = cfg.coord_soft_ce_w1, cfg.stage2_ab
    return {"loss/coord_token_ce": s.coord_ce_weight,
            "loss/coord_soft_ce": c.soft_ce_weight if c.enabled else 0.0,
            "loss/coord_w1": c.w1_weight if c.enabled else 0.0,
            "loss/coord_gate": s.coord_gate_weight, "loss/text_gate": s.text_gate_weight,
            "loss/bbox_smoothl1": s.bbox_smoothl1_weight, "loss/bbox_ciou": s.bbox_ciou_weight}


# -- unweighted terms ----------------------------------------------------------------------------
def text_rows(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Supervised text positions (b [M], t [M]) and whether each is a struct token [M]."""
    kinds = torch.tensor((STRUCT, DESC), device=batch.token_type.device)
    b, t = torch.isin(batch.token_type, kinds).nonzero(as_tuple=True)
    return b, t, batch.token_type[b, t] == STRUCT


def text_outputs(head: Head, batch: Batch, rows, gate_temperature: float
                 ) -> tuple[Tensor, Tensor]:
    """Token CE [M] at the text rows and the full-vocab lse [M] the text gate needs."""
    b, t, _ = rows
    lse = head.vocab_lse(b, t)  # [M]
    ce = lse - head.label_logits(b, t, batch.labels[b, t])
    gate_lse = lse if gate_temperature == 1.0 else head.vocab_lse(b, t, gate_temperature)
    return ce, gate_lse


def supervised_terms(head: Head, batch: Batch, rows, gate_lse: Tensor, cfg: Config
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Coord, box and text-gate terms (unweighted) and coord_diag, from one pass's head."""
    c, s = cfg.coord_soft_ce_w1, cfg.stage2_ab
    b, t = batch.coord_b, batch.coord_t
    coord_logits = head.coord_logits(b, t)  # [N, K]
    lse = head.vocab_lse(b, t, c.temperature)  # [N]
    terms = coord_terms(coord_logits, lse, batch.coord_bins, sigma=c.target_sigma,
                        truncate=c.target_truncate, temperature=c.temperature,
                        decode_mode=s.coord_decode_mode, decode_temperature=s.softctx_temperature)
    terms["loss/text_gate"] = text_gate_from_lse(head.coord_logits(*rows[:2]), gate_lse,
                                                 temperature=c.temperature)
    with torch.no_grad():
        diag_lse = lse if s.softctx_temperature == c.temperature else \
            head.vocab_lse(b, t, s.softctx_temperature)
    diag = coord_diag(coord_logits.detach(), batch.coord_bins, vocab_lse=diag_lse.detach(),
                      temperature=s.softctx_temperature)
    return terms, diag


def assemble(token_ce: Tensor, terms: dict[str, Tensor], num_slots: int, num_text: int,
             cfg: Config) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total, and stats: unweighted terms plus loss/coord_reg and loss/geo."""
    w = objective_weights(cfg)
    coord_reg = sum(w[k] * terms[k] for k in COORD_REG)
    geo = sum(w[k] * terms[k] for k in GEO)
    loss = token_ce + coord_reg + geo
    stats = {k: stat(v, num_text if k == "loss/text_gate" else num_slots)
             for k, v in terms.items()}
    return loss, stats | {"loss/token_ce": stat(token_ce, 1), "loss/coord_reg": stat(coord_reg, 1),
                          "loss/geo": stat(geo, 1), "loss": stat(loss, 1)}


def _mean_stat(values: Tensor, mask: Tensor) -> Tensor:
    return stat(weighted_mean(values.detach(), mask.float()), int(mask.sum()))


# -- the channels ----------------------------------------------------------------------------
def channel_a_step(model, batch: Batch, cfg: Config, coord_ids: Tensor) -> StepOutput:
    s, c = cfg.stage2_ab, cfg.coord_soft_ce_w1
    passes = soft_context_forward(model, batch, coord_ids, s)
    rows = text_rows(batch)
    is_struct = rows[2]
    ce_first, gate_lse = text_outputs(passes.first, batch, rows, c.temperature)
    anchor = weighted_mean(ce_first, torch.where(is_struct, 1.0, s.desc_ce_weight))
    stats = {"loss/token_ce_anchor": stat(anchor, len(is_struct)),
             "loss/struct_ce": _mean_stat(ce_first, is_struct),
             "loss/desc_ce": _mean_stat(ce_first, ~is_struct)}
    token_ce = anchor
    if passes.final is not passes.first:  # n > 1: the struct / end-of-turn stabiliser
        ce_final, gate_lse = text_outputs(passes.final, batch, rows, c.temperature)
        self_context = weighted_mean(ce_final, is_struct.float())
        stats["loss/token_ce_self_context"] = stat(self_context, int(is_struct.sum()))
        token_ce = anchor + s.fmt_struct_ce_weight * self_context
    terms, diag = supervised_terms(passes.final, batch, rows, gate_lse, cfg)
    loss, term_stats = assemble(token_ce, terms, len(batch.coord_bins), len(is_struct), cfg)
    return StepOutput(loss, stats | term_stats | diag)


def channel_b_step(model, collator: Collator, records: list[Record], cfg: Config,
                   coord_ids: Tensor, seed: int) -> StepOutput:
    """Rollout -> parse -> match -> targets -> one teacher-forced forward -> the same terms."""
    started = time.perf_counter()
    rollouts = generate_rollouts(model, collator.processor, records, cfg.rollout, progress=False,
                                 seed=seed, field_order=cfg.data.field_order)
    seconds = time.perf_counter() - started
    targets = [build_target(r, rec, collator, cfg) for r, rec in zip(rollouts, records,
                                                                       strict=True)]
    batch, weights = encode_targets(collator, records, targets)
    batch, weights = batch.to(coord_ids.device), weights.to(coord_ids.device)
    head = HiddenHead(hidden_states(model, batch.inputs), lm_head_weight(model), coord_ids)
    rows = text_rows(batch)
    ce, gate_lse = text_outputs(head, batch, rows, cfg.coord_soft_ce_w1.temperature)
    token_ce = weighted_mean(ce, weights[rows[0], rows[1]])
    terms, diag = supervised_terms(head, batch, rows, gate_lse, cfg)
    loss, term_stats = assemble(token_ce, terms, len(batch.coord_bins), len(ce), cfg)
    stats = {"loss/struct_ce": _mean_stat(ce, rows[2]), "loss/desc_ce": _mean_stat(ce, ~rows[2])}
    return StepOutput(loss, stats | term_stats | diag | rollout_stats(targets, seconds))


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


def make_stage2_step(model, collator: Collator, cfg: Config, coord_ids: Tensor) -> Stage2Step:
    return Stage2Step(model, collator, cfg, coord_ids)
