"""The Stage-1 step: one teacher-forced forward, token CE on non-coord tokens plus the CoordExp
coordinate terms (soft CE, W1, gate, optional hard CE) and optional box losses on the
expectation decode. LM-head logits are computed only where a loss reads them."""

from __future__ import annotations

import torch
from torch import Tensor

from coordexp.config import Config
from coordexp.data.collate import COORD, DESC, STRUCT, Batch
from coordexp.decode import decode_coords
from coordexp.diagnostics import coord_diag
from coordexp.lmhead import coord_slice_logits, label_logits, vocab_logsumexp
from coordexp.losses import (
    bbox_ciou,
    bbox_smoothl1,
    coord_gate_from_lse,
    coord_hard_ce,
    coord_soft_ce,
    coord_w1,
)
from coordexp.model.adapter import hidden_states, lm_head_weight
from coordexp.train.step import StepOutput, stat


def text_ce(hidden: Tensor, weight: Tensor, batch: Batch, types: tuple[int, ...]) -> Tensor:
    """Mean CE over answer tokens of the given types (logits at t - 1 predict token t)."""
    mask = torch.isin(batch.token_type, torch.tensor(types, device=hidden.device))
    b, t = mask.nonzero(as_tuple=True)
    h = hidden[b, t - 1]  # [M, D]
    ce = vocab_logsumexp(h, weight) - label_logits(h, weight, batch.labels[b, t])  # [M]
    return ce.mean() if len(ce) else hidden.sum() * 0


def coord_terms(coord_logits: Tensor, vocab_lse: Tensor, target_bins: Tensor, *, sigma: float,
                truncate: float | None, temperature: float, decode_mode: str,
                decode_temperature: float | None = None) -> dict[str, Tensor]:
    """Unweighted coordinate and box terms for slots grouped 4 per box: [N, K], [N], [N].
    Boxes decode at decode_temperature (Stage 2: softctx_temperature), default temperature."""
    kw = dict(sigma=sigma, truncate=truncate, temperature=temperature)
    tau = temperature if decode_temperature is None else decode_temperature
    pred = decode_coords(coord_logits, decode_mode, tau).reshape(-1, 4)  # [N/4, 4]
    gt = (target_bins.float() / (coord_logits.shape[-1] - 1)).reshape(-1, 4)
    return {
        "loss/coord_token_ce": coord_hard_ce(coord_logits, target_bins),
        "loss/coord_soft_ce": coord_soft_ce(coord_logits, target_bins, **kw),
        "loss/coord_w1": coord_w1(coord_logits, target_bins, **kw),
        "loss/coord_gate": coord_gate_from_lse(coord_logits, vocab_lse, temperature=temperature),
        "loss/bbox_smoothl1": bbox_smoothl1(pred, gt),
        "loss/bbox_ciou": bbox_ciou(pred, gt),
    }


def stage1_step(model, batch: Batch, cfg: Config, coord_ids: Tensor) -> StepOutput:
    c = cfg.coord_soft_ce_w1
    hidden = hidden_states(model, batch.inputs)  # [B, T, D]
    weight = lm_head_weight(model)  # [V, D]
    if not c.enabled:  # the pure-CE ablation: coord tokens stay in the full-vocabulary CE
        token_ce = text_ce(hidden, weight, batch, (STRUCT, DESC, COORD))
        return StepOutput(token_ce, {"loss/token_ce": stat(token_ce, 1), "loss": stat(token_ce, 1)})
    token_ce = text_ce(hidden, weight, batch, (STRUCT, DESC))
    h = hidden[batch.coord_b, batch.coord_t - 1]  # [N, D]
    coord_logits = coord_slice_logits(h, weight, coord_ids)  # [N, K]
    vocab_lse = vocab_logsumexp(h, weight, temperature=c.temperature)  # [N]
    terms = coord_terms(coord_logits, vocab_lse, batch.coord_bins, sigma=c.target_sigma,
                        truncate=c.target_truncate, temperature=c.temperature, decode_mode="exp")
    weights = {"loss/coord_token_ce": c.ce_weight, "loss/coord_soft_ce": c.soft_ce_weight,
               "loss/coord_w1": c.w1_weight, "loss/coord_gate": c.gate_weight}
    coord_reg = sum(w * terms[k] for k, w in weights.items())
    geo = c.bbox_smoothl1_weight * terms["loss/bbox_smoothl1"] + \
        c.bbox_ciou_weight * terms["loss/bbox_ciou"]
    loss = token_ce + coord_reg + geo
    n = len(batch.coord_bins)
    stats = {k: stat(v, n) for k, v in terms.items()}
    stats |= {"loss/token_ce": stat(token_ce, 1), "loss/coord_reg": stat(coord_reg, 1),
              "loss/geo": stat(geo, 1), "loss": stat(loss, 1)}
    stats |= coord_diag(coord_logits.detach(), batch.coord_bins, vocab_lse=vocab_lse.detach(),
                        temperature=c.temperature)
    return StepOutput(loss, stats)
