"""What the trainers need from a Qwen-VL model: hidden states, the LM-head weight, embeddings,
and the pieces of the fast Channel A (vision once, explicit M-RoPE positions, prefix K/V reuse).

The fast path calls the inner modules of `...ForConditionalGeneration` directly:
`model.model.get_rope_index` (positions), `model.model.get_image_features` (vision tower) and
`model.model.language_model` (the decoder, with a `DynamicCache` holding the shared prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.utils.other import TrainableTokensWrapper
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from coordexp.data.collate import Batch
from coordexp.data.packing import Layout, pack_batch, plan_packs
from coordexp.model.packed_attention import use_packed_attention


class ReplayCache(DynamicCache):
    """A DynamicCache whose writes may run twice: under per-layer activation checkpointing a
    layer's forward (cache write included) is replayed in backward. Each layer's keys/values
    are the ones it started with plus its latest write, never the write appended twice."""

    def __init__(self, kv: list[tuple[Tensor, Tensor]] | None = None, *, config):
        super().__init__(ddp_cache_data=kv, config=config)
        self.start: dict[int, int] = {}  # layer -> cached length before this call's write

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kw):
        layer = self.layers[layer_idx]
        if layer_idx in self.start:  # a replay: drop the first write
            n = self.start[layer_idx]
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        else:
            self.start[layer_idx] = layer.get_seq_length()
        return super().update(key_states, value_states, layer_idx, *args, **kw)


def hidden_states(model, inputs: dict[str, Tensor]) -> Tensor:
    """Final (normed) hidden states [B, T, D] of the full multimodal forward; no logits."""
    return model.model(**inputs, use_cache=False).last_hidden_state


def lm_head_weight(model) -> Tensor:
    """The head's effective weight [V, D]. Under PEFT trainable tokens the head module keeps the
    frozen base weight and its trainable coord rows apart; this is the base with those rows
    written in (a differentiable copy, so gradients reach the rows)."""
    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper):
        return head.token_adapter.get_merged_weights(head.token_adapter.active_adapters)
    return head.weight


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


# -- the fast path -----------------------------------------------------------------------------
def rope_position_ids(model, inputs: dict[str, Tensor]) -> Tensor:
    """M-RoPE positions [3, B, T] from input ids, image grids and the padding mask.

    Always pass these explicitly when calling with `inputs_embeds`: without input ids the model
    silently falls back to 1-D positions or to stale `rope_deltas` kept from an earlier call.
    """
    return model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])[0]


def pack_rows(model, batch: Batch, packing_length: int) -> tuple[Batch, Layout]:
    """The padded batch's samples as padding-free rows of up to packing_length tokens (a longer
    sample runs alone). Each sample keeps the M-RoPE positions `get_rope_index` gives it in the
    padded batch; a text row restarting per sample is prepended (the [4, R, L] position ids
    Qwen2.5-VL / Qwen3-VL read for packed input), so with no attention mask the decoder builds
    a block-diagonal causal mask (sdpa) or variable-length sequences (flash-attention). An
    sdpa decoder is switched to sdpa per packed sample (model/packed_attention.py), which
    skips the mask's cross-sample pairs."""
    use_packed_attention(model)
    lengths = batch.inputs["attention_mask"].sum(1).tolist()
    packs = plan_packs(lengths, packing_length, allow_single_long=True)
    return pack_batch(batch, rope_position_ids(model, batch.inputs), packs)


@dataclass
class MultimodalInputs:
    """Everything a decoder call needs besides the token embeddings, computed once per step."""

    embeds: Tensor  # [B, T, D] token embeddings with the image features spliced in
    attention_mask: Tensor  # [B, T]
    position_ids: Tensor  # [3, B, T] M-RoPE
    visual_mask: Tensor | None = None  # [B, T] image rows (Qwen3-VL deepstack only)
    deepstack: list[Tensor] | None = None  # per deepstack layer: [rows of visual_mask, D]


def embed_multimodal(model, inputs: dict[str, Tensor]) -> MultimodalInputs:
    """Token embeddings with the vision tower's output spliced in (the tower runs once here)."""
    ids = inputs["input_ids"]
    embeds = input_embeddings(model)(ids)  # [B, T, D]
    mm = MultimodalInputs(embeds, inputs["attention_mask"], rope_position_ids(model, inputs))
    if "pixel_values" not in inputs:
        return mm
    vision = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                            return_dict=True)
    image_mask = ids == model.config.image_token_id  # [B, T]
    features = torch.cat(vision.pooler_output).to(embeds.dtype)  # [rows, D]
    mm.embeds = embeds.masked_scatter(image_mask[..., None].expand_as(embeds), features)
    deepstack = vision.get("deepstack_features")  # Qwen3-VL only
    if deepstack:
        mm.visual_mask = image_mask
        mm.deepstack = [torch.cat(f).to(embeds.dtype) for f in deepstack]
    return mm


def _decoder(model, mm: MultimodalInputs, embeds: Tensor, start: int, cache) -> Tensor:
    """Decoder hidden states for columns start..start+len(embeds) given `cache` = K/V of
    columns 0..start. The mask covers every column so far; positions only the new ones."""
    end = start + embeds.shape[1]
    extra = {}
    if mm.deepstack is not None:
        cols = mm.visual_mask.nonzero()[:, 1]  # b-major, the order of the deepstack rows
        rows = (cols >= start) & (cols < end)
        if bool(rows.any()):
            extra = {"visual_pos_masks": mm.visual_mask[:, start:end],
                     "deepstack_visual_embeds": [f[rows] for f in mm.deepstack]}
    return model.model.language_model(
        inputs_embeds=embeds, attention_mask=mm.attention_mask[:, :end],
        position_ids=mm.position_ids[:, :, start:end], cache=cache, use_cache=True,
        **extra).last_hidden_state


@dataclass
class Prefix:
    """The shared prefix (columns 0..length): its hidden states and per-layer keys/values."""

    length: int
    hidden: Tensor  # [B, P, D]
    kv: list[tuple[Tensor, Tensor]]  # per layer ([B, H, P, d], [B, H, P, d])


def run_prefix(model, mm: MultimodalInputs, length: int) -> Prefix:
    """Run the first `length` columns once; every later suffix call attends to their K/V and
    back-propagates into them (a cache concatenates, it does not detach)."""
    cache = ReplayCache(config=model.model.language_model.config)
    hidden = _decoder(model, mm, mm.embeds[:, :length], 0, cache)
    return Prefix(length, hidden, [(layer.keys, layer.values) for layer in cache.layers])


def run_suffix(model, mm: MultimodalInputs, prefix: Prefix, embeds: Tensor,
               recompute: bool = False) -> Tensor:
    """Hidden states [B, T - P, D] of columns P = prefix.length on, for the sequence whose
    columns from P on have the embeddings `embeds[:, P:]` (earlier columns are ignored).

    Each call gets a fresh cache: a reused one would have grown to T and silently shift the
    next call's queries. With `recompute` (and grad on) the suffix keeps only its inputs for
    backward and runs again there (activation checkpointing through the shared prefix K/V).
    """
    def suffix(tail: Tensor) -> Tensor:
        cache = ReplayCache(prefix.kv, config=model.model.language_model.config)
        return _decoder(model, mm, tail, prefix.length, cache)

    tail = embeds[:, prefix.length:]
    if recompute and torch.is_grad_enabled():
        return checkpoint(suffix, tail, use_reentrant=False)
    return suffix(tail)
