"""The loss terms every step shares (Stage 1, Channel A, Channel B), the one weighting function,
and what a step returns.

A step computes named, unweighted terms at named rows (text CE, coord and box terms at the coord
slots, the text gate); `objective_weights` says what each weighs and `weighted_total` applies the
weights once, as DETR's criterion does. Statistics are float64 (sum, count) pairs, detached;
micro-batches and ranks add pairs and the logged value sum / count forms only at log time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from coordexp.config import Config, CoordSoftCEW1Config
from coordexp.data.collate import DESC, STRUCT, Batch
from coordexp.decode import decode_coords
from coordexp.diagnostics import coord_diag
from coordexp.lmhead import Head, Rows, joint_vocab_lse
from coordexp.losses import (
    bbox_ciou,
    bbox_smoothl1,
    coord_gate_from_lse,
    coord_hard_ce,
    coord_soft_ce,
    coord_w1,
    text_gate_from_lse,
    weighted_mean,
)

COORD_REG = ("loss/coord_token_ce", "loss/coord_soft_ce", "loss/coord_w1", "loss/coord_gate",
             "loss/text_gate")
GEO = ("loss/bbox_smoothl1", "loss/bbox_ciou")
UNLIKELIHOOD = "loss/duplicate_ul"


# -- what a step returns -----------------------------------------------------------------------
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


def mean_stat(values: Tensor, mask: Tensor) -> Tensor:  # the pair of values [M] where mask [M]
    return stat(weighted_mean(values.detach(), mask.float()), int(mask.sum()))


# -- rows -------------------------------------------------------------------------------------
def typed_rows(batch: Batch, kinds: tuple[int, ...]) -> Rows:
    """Answer positions whose token type is one of kinds."""
    kinds = torch.tensor(kinds, device=batch.token_type.device)
    return Rows(*torch.isin(batch.token_type, kinds).nonzero(as_tuple=True))


def text_rows(batch: Batch) -> tuple[Rows, Tensor]:
    """Supervised text positions (struct and desc tokens) and whether each is struct [M]."""
    rows = typed_rows(batch, (STRUCT, DESC))
    return rows, batch.token_type[rows.b, rows.t] == STRUCT


def slot_rows(batch: Batch) -> Rows:  # coord slots, 4 per box; targets: batch.coord_bins [N]
    return Rows(batch.coord_b, batch.coord_t)


def step_lse(text: list[tuple[Head, Rows]], slots: tuple[Head, Rows],
             temperature: float) -> tuple[list[Tensor], Tensor]:
    """Full-vocabulary lse of each text row set (temperature 1, for CE) and of the coord slots
    (at the coord temperature), in one LM-head call when both temperatures are 1."""
    if temperature == 1.0:
        *text_lse, slot_lse = joint_vocab_lse([*text, slots])
        return text_lse, slot_lse
    head, at = slots
    return joint_vocab_lse(text), head.vocab_lse(at, temperature)


# -- unweighted terms ---------------------------------------------------------------------------
def text_ce(head: Head, batch: Batch, at: Rows, lse: Tensor) -> Tensor:
    """Token CE [M] at target rows, given their full-vocabulary lse [M]."""
    return lse - head.label_logits(at, batch.labels[at.b, at.t])


def unlikelihood(head: Head, at: Rows, tokens: Tensor, lse: Tensor) -> Tensor:
    """Mean -log(1 - p) at rows [U] (0 without rows), p the probability of the row's token
    (tokens [U]) or of its inclusive id range (tokens [U, 2]); lse: their full-vocabulary lse.
    1 - p is the probability of every other token, so -log(1 - p) = lse - lse without the
    tokens: exact even where p rounds to 1 in float32."""
    if len(at) == 0:
        return lse.new_zeros(())
    return (lse - head.vocab_lse_without(at, tokens)).mean()


def coord_terms(coord_logits: Tensor, vocab_lse: Tensor, target_bins: Tensor, *, sigma: float,
                truncate: float | None, temperature: float, decode_mode: str,
                decode_temperature: float) -> dict[str, Tensor]:
    """Unweighted coordinate and box terms for slots grouped 4 per box: [N, K], [N], [N].
    Boxes decode at decode_temperature (Stage 1: the coord temperature; Stage 2:
    softctx_temperature)."""
    kw = dict(sigma=sigma, truncate=truncate, temperature=temperature)
    pred = decode_coords(coord_logits, decode_mode, decode_temperature).reshape(-1, 4)  # [N/4, 4]
    gt = (target_bins.float() / (coord_logits.shape[-1] - 1)).reshape(-1, 4)
    return {
        "loss/coord_token_ce": coord_hard_ce(coord_logits, target_bins),
        "loss/coord_soft_ce": coord_soft_ce(coord_logits, target_bins, **kw),
        "loss/coord_w1": coord_w1(coord_logits, target_bins, **kw),
        "loss/coord_gate": coord_gate_from_lse(coord_logits, vocab_lse, temperature=temperature),
        "loss/bbox_smoothl1": bbox_smoothl1(pred, gt),
        "loss/bbox_ciou": bbox_ciou(pred, gt),
    }


def slot_terms(head: Head, slots: Rows, target_bins: Tensor, lse: Tensor,
               c: CoordSoftCEW1Config, decode_mode: str, decode_temperature: float
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Coord and box terms (unweighted) and coord_diag at the coord slots; lse: their
    full-vocabulary lse at c.temperature. Diagnostics read the decode temperature."""
    coord_logits = head.coord_logits(slots)  # [N, K]
    terms = coord_terms(coord_logits, lse, target_bins, sigma=c.target_sigma,
                        truncate=c.target_truncate, temperature=c.temperature,
                        decode_mode=decode_mode, decode_temperature=decode_temperature)
    with torch.no_grad():
        diag_lse = lse if decode_temperature == c.temperature else \
            head.vocab_lse(slots, decode_temperature)
    diag = coord_diag(coord_logits.detach(), target_bins, vocab_lse=diag_lse.detach(),
                      temperature=decode_temperature)
    return terms, diag


def text_gate_term(head: Head, known: Rows, known_lse: Tensor, rest: Rows, cfg: Config) -> Tensor:
    """The text gate, mean -log(1 - coord mass), over the text rows `known` and `rest`.
    known_lse: the temperature-1 lse at `known`, already computed for a CE; the lse at `rest`
    is computed here. With weight 0 the term is only logged, so it is computed without a graph."""
    tau = cfg.coord_soft_ce_w1.temperature
    rows = Rows.cat(known, rest)
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.stage2_ab.text_gate_weight > 0):
        if tau == 1.0:
            lse = torch.cat([known_lse, head.vocab_lse(rest)])
        else:
            lse = head.vocab_lse(rows, tau)
        return text_gate_from_lse(head.coord_logits(rows), lse, temperature=tau)


# -- weights, applied once ------------------------------------------------------------------------
def objective_weights(cfg: Config, stage: str) -> dict[str, float]:
    """The weight of every coord / box term: the only reader of these weights.

    Stage 1 reads coord_soft_ce_w1 alone. Stage 2 reads soft CE and W1 from coord_soft_ce_w1
    (zero when it is disabled) and the hard coord CE, the gates and the box losses from
    stage2_ab (STAGE1_ONLY lists the keys Stage 2 does not read)."""
    c, s = cfg.coord_soft_ce_w1, cfg.stage2_ab
    if stage == "stage1":
        return {"loss/coord_token_ce": c.ce_weight, "loss/coord_soft_ce": c.soft_ce_weight,
                "loss/coord_w1": c.w1_weight, "loss/coord_gate": c.gate_weight,
                "loss/text_gate": 0.0, "loss/bbox_smoothl1": c.bbox_smoothl1_weight,
                "loss/bbox_ciou": c.bbox_ciou_weight}
    return {"loss/coord_token_ce": s.coord_ce_weight,
            "loss/coord_soft_ce": c.soft_ce_weight if c.enabled else 0.0,
            "loss/coord_w1": c.w1_weight if c.enabled else 0.0,
            "loss/coord_gate": s.coord_gate_weight, "loss/text_gate": s.text_gate_weight,
            "loss/bbox_smoothl1": s.bbox_smoothl1_weight, "loss/bbox_ciou": s.bbox_ciou_weight,
            UNLIKELIHOOD: s.duplicate_ul_weight}


# coord_soft_ce_w1 keys that only Stage 1 reads -> the stage2_ab key Stage 2 reads instead
STAGE1_ONLY = {"ce_weight": "coord_ce_weight", "gate_weight": "coord_gate_weight",
               "bbox_smoothl1_weight": "bbox_smoothl1_weight",
               "bbox_ciou_weight": "bbox_ciou_weight"}


def ignored_keys_notes(cfg: Config) -> list[str]:
    """One line per Stage-1-only key a Stage-2 config sets away from its default: the run
    ignores it, and the user should know which key it reads instead."""
    if cfg.training.stage != "stage2_ab":
        return []
    default, c = CoordSoftCEW1Config(), cfg.coord_soft_ce_w1
    return [f"note: 'coord_soft_ce_w1.{key}' ({getattr(c, key)}) is read by Stage 1 only; this "
            f"Stage-2 run reads 'stage2_ab.{instead}' ({getattr(cfg.stage2_ab, instead)})"
            for key, instead in STAGE1_ONLY.items() if getattr(c, key) != getattr(default, key)]


def weighted_total(token_ce: Tensor, terms: dict[str, Tensor], weights: dict[str, float], *,
                   num_slots: int, num_text: int, num_unlikely: int = 0
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss, token_ce + coord_reg + geo (+ the duplicate unlikelihood when present), and
    its stats: every unweighted term (per slot, the text gate per text row, the unlikelihood
    per event) plus loss/coord_reg, loss/geo, loss/token_ce and loss."""
    coord_reg = sum(weights[k] * terms[k] for k in COORD_REG if k in terms)
    geo = sum(weights[k] * terms[k] for k in GEO)
    loss = token_ce + coord_reg + geo
    if UNLIKELIHOOD in terms:
        loss = loss + weights[UNLIKELIHOOD] * terms[UNLIKELIHOOD]
    counts = {"loss/text_gate": num_text, UNLIKELIHOOD: num_unlikely}
    stats = {k: stat(v, counts.get(k, num_slots)) for k, v in terms.items()}
    return loss, stats | {"loss/token_ce": stat(token_ce, 1), "loss/coord_reg": stat(coord_reg, 1),
                          "loss/geo": stat(geo, 1), "loss": stat(loss, 1)}
