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
from coordexp.train.channel_a import Head, HiddenHead, joint_vocab_lse, soft_context_forward
from coordexp.train.channel_b import build_target, encode_targets, rollout_stats
from coordexp.train.schedule import is_channel_b, schedule_stats
from coordexp.train.stage1 import coord_terms
from coordexp.train.step import StepOutput, stat

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


def text_ce(head: Head, batch: Batch, b: Tensor, t: Tensor, lse: Tensor) -> Tensor:
    """Token CE [M] at target positions (b, t), given their full-vocabulary lse [M]."""
    return lse - head.label_logits(b, t, batch.labels[b, t])


def text_gate_term(head: Head, b: Tensor, t: Tensor, cfg: Config,
                   known_lse: Tensor | None = None) -> Tensor:
    """The text gate, mean -log(1 - coord mass), at text positions (b, t). known_lse: the
    temperature-1 lse of the first rows, already computed for a CE. With weight 0 the term is
    only logged, so it is computed without a graph."""
    tau = cfg.coord_soft_ce_w1.temperature
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.stage2_ab.text_gate_weight > 0):
        if tau == 1.0 and known_lse is not None:
            k = len(known_lse)
            lse = torch.cat([known_lse, head.vocab_lse(b[k:], t[k:])])
        else:
            lse = head.vocab_lse(b, t, tau)
        return text_gate_from_lse(head.coord_logits(b, t), lse, temperature=tau)


def slot_terms(head: Head, batch: Batch, cfg: Config, lse: Tensor | None = None
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Coord and box terms (unweighted) and coord_diag at the supervised coord slots; lse:
    their full-vocabulary lse at coord_soft_ce_w1.temperature, if already computed."""
    c, s = cfg.coord_soft_ce_w1, cfg.stage2_ab
    b, t = batch.coord_b, batch.coord_t
    coord_logits = head.coord_logits(b, t)  # [N, K]
    lse = head.vocab_lse(b, t, c.temperature) if lse is None else lse  # [N]
    terms = coord_terms(coord_logits, lse, batch.coord_bins, sigma=c.target_sigma,
                        truncate=c.target_truncate, temperature=c.temperature,
                        decode_mode=s.coord_decode_mode, decode_temperature=s.softctx_temperature)
    with torch.no_grad():
        diag_lse = lse if s.softctx_temperature == c.temperature else \
            head.vocab_lse(b, t, s.softctx_temperature)
    diag = coord_diag(coord_logits.detach(), batch.coord_bins, vocab_lse=diag_lse.detach(),
                      temperature=s.softctx_temperature)
    return terms, diag


def head_lse(queries: dict[str, tuple[Head, Tensor, Tensor]], cfg: Config) -> dict[str, Tensor]:
    """Every full-vocabulary lse a step needs in one LM-head call: the text rows' (temperature
    1) and, when the coord temperature is 1 too, the coord slots' (key "slots")."""
    tau = cfg.coord_soft_ce_w1.temperature
    if tau == 1.0:
        return joint_vocab_lse(queries)
    head, b, t = queries["slots"]
    text = {k: q for k, q in queries.items() if k != "slots"}
    return joint_vocab_lse(text) | {"slots": head.vocab_lse(b, t, tau)}


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
    s = cfg.stage2_ab
    passes = soft_context_forward(model, batch, coord_ids, s)
    first, final, several = passes.first, passes.final, passes.final is not passes.first
    b, t, is_struct = text_rows(batch)
    sb, st, db, dt = b[is_struct], t[is_struct], b[~is_struct], t[~is_struct]
    queries = {"first": (first, b, t), "slots": (final, batch.coord_b, batch.coord_t)}
    if several:  # the struct / end-of-turn stabiliser reads the final pass's struct rows
        queries["final"] = (final, sb, st)
    lse = head_lse(queries, cfg)
    ce_first = text_ce(first, batch, b, t, lse["first"])
    anchor = weighted_mean(ce_first, torch.where(is_struct, 1.0, s.desc_ce_weight))
    stats = {"loss/token_ce_anchor": stat(anchor, len(b)),
             "loss/struct_ce": _mean_stat(ce_first, is_struct),
             "loss/desc_ce": _mean_stat(ce_first, ~is_struct)}
    if several:
        self_context = weighted_mean(text_ce(final, batch, sb, st, lse["final"]),
                                     torch.ones_like(lse["final"]))
        stats["loss/token_ce_self_context"] = stat(self_context, len(sb))
        token_ce = anchor + s.fmt_struct_ce_weight * self_context
        gate_rows, known = (torch.cat([sb, db]), torch.cat([st, dt])), lse["final"]
    else:
        token_ce, gate_rows, known = anchor, (b, t), lse["first"]
    terms, diag = slot_terms(final, batch, cfg, lse["slots"])
    terms["loss/text_gate"] = text_gate_term(final, *gate_rows, cfg, known_lse=known)
    loss, term_stats = assemble(token_ce, terms, len(batch.coord_bins), len(b), cfg)
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
    b, t, is_struct = text_rows(batch)
    lse = head_lse({"text": (head, b, t), "slots": (head, batch.coord_b, batch.coord_t)}, cfg)
    ce = text_ce(head, batch, b, t, lse["text"])
    token_ce = weighted_mean(ce, weights[b, t])
    terms, diag = slot_terms(head, batch, cfg, lse["slots"])
    terms["loss/text_gate"] = text_gate_term(head, b, t, cfg, known_lse=lse["text"])
    loss, term_stats = assemble(token_ce, terms, len(batch.coord_bins), len(b), cfg)
    stats = {"loss/struct_ce": _mean_stat(ce, is_struct),
             "loss/desc_ce": _mean_stat(ce, ~is_struct)}
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
