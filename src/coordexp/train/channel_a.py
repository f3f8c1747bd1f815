"""Channel A's forwards: the soft self-context loop over `n_softctx_iter` teacher-forced passes.

A1 sees the ground truth; every later pass replaces the coord-slot input embeddings by
embeddings built from the previous pass's coord distribution (`st` / `soft` / `hard`).
Two implementations give the same hidden states and gradients:
- `fast`: the vision tower runs once, the prefix before the first coord slot runs once and its
  keys/values are shared by every pass, logits are computed later only at the rows a loss
  reads (`lmhead.HiddenHead`), and (`softctx_recompute`) the non-final passes recompute their suffix
  in backward rather than keep its activations;
- `reference`: the plain full recompute (full model, full logits, every pass), kept for tests and
  the benchmark. It too passes explicit M-RoPE positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from coordexp.config import Stage2ABConfig
from coordexp.data.collate import Batch
from coordexp.decode import compute_dtype, coord_probs, straight_through
from coordexp.lmhead import Head, HiddenHead, LogitsHead, Rows
from coordexp.model.adapter import (
    embed_multimodal,
    hidden_states,
    input_embeddings,
    lm_head_weight,
    rope_position_ids,
    run_prefix,
    run_suffix,
)


@dataclass
class SoftContextOutput:
    first: Head  # A1: ground-truth context
    final: Head  # the last pass (the same object when n = 1)
    first_coord_logits: Tensor | None = None  # [N, K] A1 at the coord slots (None when n = 1)
    # per later pass: the replacement embeddings [N, D] it received, float32
    replacements: list[Tensor] = field(default_factory=list)


def context_embeddings(coord_logits: Tensor, table: Tensor, mode: str,
                       temperature: float) -> Tensor:
    """Replacement embeddings from coord distributions: [N, K] logits, [K, D] table -> [N, D].

    soft: softmax(s / tau) @ E; hard: E[argmax s]; st: the hard embedding forward (exactly),
    the soft one's gradient backward.
    """
    soft = coord_probs(coord_logits, temperature) @ table  # [N, D]
    if mode == "soft":
        return soft
    hard = table[coord_logits.argmax(-1)]  # [N, D]
    if mode == "hard":
        return hard
    if mode == "st":
        return straight_through(hard, soft)
    raise ValueError(f"coord_ctx_embed_mode must be st, soft or hard, got {mode!r}")


def soft_context_forward(model, batch: Batch, coord_ids: Tensor,
                         s: Stage2ABConfig) -> SoftContextOutput:
    """Run the n passes of Channel A with `s.channel_a_impl` and return their LM heads."""
    if batch.segments is not None:  # packed rows (n = 1 only): the one pass is a plain forward
        assert s.n_softctx_iter == 1, "Channel A with n_softctx_iter > 1 runs on padded rows"
        head = HiddenHead(hidden_states(model, batch.inputs), lm_head_weight(model), coord_ids)
        return SoftContextOutput(head, head)
    table = input_embeddings(model)(coord_ids)  # [K, D]: through the module, so hooks apply
    table = table.to(compute_dtype(table))
    base, run = (_fast_passes(model, batch, coord_ids, s.softctx_recompute)
                 if s.channel_a_impl == "fast" else _reference_passes(model, batch, coord_ids))
    first = run(base, final=s.n_softctx_iter == 1)
    out = SoftContextOutput(first, first)
    if s.n_softctx_iter == 1 or len(batch.coord_t) == 0:  # without slots every pass is A1
        return out
    slots = Rows(batch.coord_b, batch.coord_t)
    detach = s.softctx_grad_mode == "em_detach"
    for m in range(1, s.n_softctx_iter):
        last = m == s.n_softctx_iter - 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and (last or not detach)):
            logits = out.final.coord_logits(slots)  # [N, K] of the previous pass
            if m == 1:
                out.first_coord_logits = logits
            ctx = context_embeddings(logits, table, s.coord_ctx_embed_mode,
                                     s.softctx_temperature)  # [N, D]
            if detach:
                ctx = ctx.detach()
            out.replacements.append(ctx)
            out.final = run(base.index_put((slots.b, slots.t), ctx.to(base.dtype)), final=last)
    return out


def _fast_passes(model, batch: Batch, coord_ids: Tensor, recompute: bool):
    """Vision tower and prefix (up to the first coord slot) once, here; every pass then runs
    only the suffix. Returns the base embeddings and (embeddings, final) -> HiddenHead.

    With `recompute`, a non-final pass keeps only its inputs for backward and reruns its
    suffix there: the final pass's activations are the only ones kept."""
    mm = embed_multimodal(model, batch.inputs)
    total = mm.embeds.shape[1]
    length = int(batch.coord_t.min()) if len(batch.coord_t) else total
    prefix = run_prefix(model, mm, length)
    weight = lm_head_weight(model)

    def run(embeds: Tensor, final: bool) -> HiddenHead:
        if length == total:
            return HiddenHead(prefix.hidden, weight, coord_ids)
        suffix = run_suffix(model, mm, prefix, embeds, recompute=recompute and not final)
        return HiddenHead(torch.cat([prefix.hidden, suffix], dim=1), weight, coord_ids)

    return mm.embeds, run


def _reference_passes(model, batch: Batch, coord_ids: Tensor):
    """Every pass is the full model (vision tower included) with full logits [B, T, V], and
    keeps all its activations. Image rows keep their placeholder embeddings: the model finds
    them by value and splices."""
    inputs = batch.inputs
    pos = rope_position_ids(model, inputs)  # explicit: inputs_embeds alone gets them wrong

    def run(embeds: Tensor, final: bool) -> LogitsHead:
        logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                       position_ids=pos, pixel_values=inputs.get("pixel_values"),
                       image_grid_thw=inputs.get("image_grid_thw"), use_cache=False).logits
        return LogitsHead(logits, coord_ids)

    return input_embeddings(model)(inputs["input_ids"]), run
