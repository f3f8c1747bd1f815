"""Memory-lean LM-head outputs: only what the CoordExp losses need, never [B, T, V] logits.

The caller gathers hidden states h [N, D] at the rows *before* each target (the causal shift)
and passes the LM-head weight W [V, D]. From them:
- `coord_slice_logits`: the K coord columns at those rows, [N, K];
- `vocab_logsumexp`: logsumexp(h W^T / tau) over the full vocabulary, [N], chunked over V by an
  autograd Function that saves only h, W and the result and recomputes chunks in backward;
- `label_logits`: the target column at each row, [N], so token CE = vocab_lse - label_logit;
`HiddenHead` serves them from hidden states at named `Rows`, `LogitsHead` from full logits (the
reference path), and `joint_vocab_lse` takes several row sets through one LM-head call.
Pure torch; no transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from coordexp.decode import compute_dtype

CHUNK_SIZE = 8192  # vocabulary columns per chunk: [N, CHUNK_SIZE] float32 is the working set


def _head_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(compute_dtype(h), weight.dtype)


def coord_slice_logits(h: Tensor, weight: Tensor, coord_ids: Tensor) -> Tensor:
    """Logits of the coord tokens only: h [N, D], W [V, D], coord_ids [K] -> [N, K] float32.

    A gather of K rows of W costs K x D whether or not the ids are contiguous, so it is not
    special-cased; its backward scatters into W's gradient like any embedding lookup.
    """
    dtype = _head_dtype(h, weight)
    return h.to(dtype) @ weight.index_select(0, coord_ids).to(dtype).T


def label_logits(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Logit of each row's target token: h [N, D], W [V, D], labels [N] -> [N] float32."""
    dtype = _head_dtype(h, weight)
    return (h.to(dtype) * weight.index_select(0, labels).to(dtype)).sum(-1)


class _VocabLogSumExp(torch.autograd.Function):
    """lse_n = logsumexp_v (h_n . W_v / tau), computed over vocabulary chunks.

    Backward recomputes each chunk's logits z = h W^T: with p = exp(z / tau - lse),
    d lse_n / d z_nv = p_nv / tau, so grad_h = (g p / tau) W and grad_W = (g p / tau)^T h.
    With `exclude` [N, 2], row n leaves tokens exclude_n0..exclude_n1 (inclusive) out of its sum.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, temperature: float, chunk_size: int,
                exclude: Tensor | None) -> Tensor:
        dtype = _head_dtype(h, weight)
        h_scaled = h.to(dtype) / temperature  # [N, D]
        chunk_lse, start = [], 0
        for w in weight.split(chunk_size):  # [C, D] views, no copy
            z = _leave_out(h_scaled @ w.to(dtype).T, exclude, start)  # [N, C]
            chunk_lse.append(z.logsumexp(-1))  # [N]
            start += w.shape[0]
        lse = torch.stack(chunk_lse, dim=-1).logsumexp(-1)  # [N]
        ctx.save_for_backward(h, weight, lse)
        ctx.temperature, ctx.chunk_size, ctx.exclude = temperature, chunk_size, exclude
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse: Tensor):
        h, weight, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        h_full = h.to(lse.dtype)  # [N, D]
        h_scaled = h_full / ctx.temperature
        row_scale = (grad_lse.to(lse.dtype) / ctx.temperature)[:, None]  # [N, 1]
        grad_h = torch.zeros_like(h_scaled) if need_h else None  # [N, D]
        grad_w = torch.empty_like(weight) if need_w else None  # [V, D]
        start = 0
        for w in weight.split(ctx.chunk_size):
            w = w.to(lse.dtype)  # [C, D]
            g = _leave_out(h_scaled @ w.T, ctx.exclude, start)  # [N, C]
            g = g.sub_(lse[:, None]).exp_().mul_(row_scale)
            if need_h:
                grad_h.addmm_(g, w)
            if need_w:
                grad_w[start : start + w.shape[0]] = g.T @ h_full
            start += w.shape[0]
        grad_h = grad_h.to(h.dtype) if need_h else None
        return grad_h, grad_w, None, None, None


def _as_ranges(tokens: Tensor) -> Tensor:
    """Token ids [N] or inclusive id ranges [N, 2] -> ranges [N, 2]."""
    return tokens[:, None].expand(-1, 2) if tokens.dim() == 1 else tokens


def _leave_out(z: Tensor, exclude: Tensor | None, start: int) -> Tensor:
    """z [N, C] (vocabulary columns start..start+C) with columns exclude_n0..exclude_n1 of row n
    at -inf."""
    if exclude is None:
        return z
    cols = torch.arange(start, start + z.shape[1], device=z.device)  # [C]
    out = (cols >= exclude[:, :1]) & (cols <= exclude[:, 1:])  # [N, C]
    return z.masked_fill_(out, -torch.inf)


def vocab_logsumexp(
    h: Tensor, weight: Tensor, *, temperature: float = 1.0, chunk_size: int = CHUNK_SIZE,
    exclude: Tensor | None = None,
) -> Tensor:
    """logsumexp over the full vocabulary of h W^T / tau: h [N, D], W [V, D] -> [N] float32.

    Peak extra memory is one [N, chunk_size] block, in forward and backward; gradients flow to
    both h and W. Used for the coord gate, the text gate and token CE (CE = lse - label logit);
    with exclude [N] (a token id per row, left out of that row's sum) or [N, 2] (an inclusive
    range of ids per row) for the unlikelihood term, whose log(1 - p) = lse without the tokens -
    lse stays exact when p is near 1.
    """
    exclude = None if exclude is None else _as_ranges(exclude)
    return _VocabLogSumExp.apply(h, weight, temperature, chunk_size, exclude)


# -- LM-head views at target rows --------------------------------------------------------------
@dataclass(frozen=True)
class Rows:
    """Target positions: batch index b [M] and token index t [M]. A head reads row t - 1 (the
    causal shift) to predict token t."""

    b: Tensor
    t: Tensor

    def __len__(self) -> int:
        return len(self.b)

    def __getitem__(self, mask: Tensor) -> Rows:
        return Rows(self.b[mask], self.t[mask])

    @staticmethod
    def cat(*parts: Rows) -> Rows:
        return Rows(torch.cat([p.b for p in parts]), torch.cat([p.t for p in parts]))


class HiddenHead:
    """LM-head outputs from hidden states [B, T, D] and the head weight [V, D], only at the
    rows asked for."""

    def __init__(self, hidden: Tensor, weight: Tensor, coord_ids: Tensor):
        self.hidden, self.weight, self.coord_ids = hidden, weight, coord_ids

    def rows(self, at: Rows) -> Tensor:  # [M, D]
        return self.hidden[at.b, at.t - 1]

    def lse_of_rows(self, rows: Tensor, temperature: float = 1.0) -> Tensor:  # [M]
        return vocab_logsumexp(rows, self.weight, temperature=temperature)

    def vocab_lse(self, at: Rows, temperature: float = 1.0) -> Tensor:  # [M]
        return self.lse_of_rows(self.rows(at), temperature)

    def coord_logits(self, at: Rows) -> Tensor:  # [M, K]
        return coord_slice_logits(self.rows(at), self.weight, self.coord_ids)

    def label_logits(self, at: Rows, labels: Tensor) -> Tensor:  # [M]
        return label_logits(self.rows(at), self.weight, labels)

    def vocab_lse_without(self, at: Rows, tokens: Tensor) -> Tensor:
        """[M]: the lse with tokens [M] (or inclusive id ranges [M, 2]) left out."""
        return vocab_logsumexp(self.rows(at), self.weight, exclude=tokens)


class LogitsHead:
    """The same outputs read from full logits [B, T, V] (the reference path)."""

    def __init__(self, logits: Tensor, coord_ids: Tensor):
        self.logits, self.coord_ids = logits, coord_ids

    def rows(self, at: Rows) -> Tensor:  # [M, V]
        return self.logits[at.b, at.t - 1].to(compute_dtype(self.logits))

    def lse_of_rows(self, rows: Tensor, temperature: float = 1.0) -> Tensor:  # [M]
        return (rows / temperature).logsumexp(-1)

    def vocab_lse(self, at: Rows, temperature: float = 1.0) -> Tensor:
        return self.lse_of_rows(self.rows(at), temperature)

    def coord_logits(self, at: Rows) -> Tensor:
        return self.rows(at)[:, self.coord_ids]

    def label_logits(self, at: Rows, labels: Tensor) -> Tensor:
        return self.rows(at).gather(-1, labels[:, None])[:, 0]

    def vocab_lse_without(self, at: Rows, tokens: Tensor) -> Tensor:
        return _leave_out(self.rows(at).clone(), _as_ranges(tokens), 0).logsumexp(-1)


Head = HiddenHead | LogitsHead


def joint_vocab_lse(sets: list[tuple[Head, Rows]], temperature: float = 1.0) -> list[Tensor]:
    """vocab_lse of several (head, rows) sets of one model in a single LM-head call, in the
    order given: one pass over the vocabulary and one weight-gradient buffer, not one per set."""
    rows = torch.cat([head.rows(at) for head, at in sets])
    lse = sets[0][0].lse_of_rows(rows, temperature)
    return list(lse.split([len(at) for _, at in sets]))
