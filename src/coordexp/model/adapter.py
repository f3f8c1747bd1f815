"""What the trainers need from a Qwen-VL model: hidden states, the LM-head weight, embeddings."""

from __future__ import annotations

import torch
from torch import Tensor


def hidden_states(model, inputs: dict[str, Tensor]) -> Tensor:
    """Final (normed) hidden states [B, T, D] of the full multimodal forward; no logits."""
    return model.model(**inputs, use_cache=False).last_hidden_state


def lm_head_weight(model) -> Tensor:
    return model.get_output_embeddings().weight  # [V, D]


def input_embeddings(model) -> torch.nn.Embedding:
    return model.get_input_embeddings()


@torch.no_grad()
def init_coord_embeddings_ordinal(model, coord_ids: list[int], scale: float = 1.0,
                                  seed: int = 0) -> None:
    """Place the coord-token embeddings on a smooth 1-D curve (Fourier features of k/(K-1) in
    random directions) around their mean, so neighbouring bins start with similar embeddings
    and, through a tied head, similar logits: an ordinal prior the model need not discover."""
    emb = input_embeddings(model).weight  # [V, D]
    ids = torch.tensor(coord_ids)
    k = torch.linspace(0, 1, len(coord_ids))[:, None]  # [K, 1]
    freqs = torch.arange(1, 9, dtype=torch.float32)[None, :] * torch.pi  # [1, F]
    feats = torch.cat([torch.cos(k * freqs), torch.sin(k * freqs)], -1)  # [K, 2F]
    gen = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(emb.shape[1], feats.shape[1], generator=gen))[0]
    rows = emb[ids].mean(0) + scale * emb[ids].std() * feats @ directions.T  # [K, D]
    emb[ids] = rows.to(emb.dtype)
