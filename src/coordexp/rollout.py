"""Batched rollouts with the HF model: left-padded prompts with images, KV cache, stop at end
of turn, raw token log-probs, and the optional CoordJSON grammar (`coordexp.grammar`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm
from transformers import GenerationConfig, LogitsProcessor, RepetitionPenaltyLogitsProcessor

from coordexp.config import RolloutConfig
from coordexp.data.collate import Collator, load_image
from coordexp.data.records import Record
from coordexp.errors import UserError
from coordexp.grammar import (
    GrammarProcessor,
    TokenTable,
    coordjson_grammar,
    decode_pieces,
    token_table,
)


@dataclass
class Rollout:
    """One generated answer; every per-token list covers the tokens before the end of turn."""

    text: str  # == "".join(pieces)
    token_ids: list[int]
    token_logprobs: list[float]  # log-prob of each token under the raw (unprocessed) model
    pieces: list[str]  # decoded text of each token
    hit_max_new_tokens: bool  # stopped by the budget, not by an end-of-turn token


class LogprobRecorder(LogitsProcessor):
    """Log-prob of each chosen token under the raw logits; must be the first processor."""

    def __init__(self):
        self.previous: torch.Tensor | None = None  # [B, V] log-probs of the last step
        self.chosen: list[torch.Tensor] = []  # per step [B, 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(1, input_ids[:, -1:]))
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of the T generated tokens (sequences ends with them)."""
        self.chosen.append(self.previous.gather(1, sequences[:, -1:]))
        return torch.cat(self.chosen, 1)


# -- generation ------------------------------------------------------------------------------
def generate_rollouts(model, processor, records: list[Record], cfg: RolloutConfig, *,
                      progress: bool = True, seed: int | None = None,
                      field_order: str = "desc_first") -> list[Rollout]:
    """Rollouts for every record in batches of cfg.batch_size (greedy, or sampled with
    cfg.temperature / cfg.top_p); the model's training mode is restored afterwards."""
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise UserError(f"rollout.batch_size and rollout.max_new_tokens must be >= 1, got "
                        f"{cfg.batch_size} and {cfg.max_new_tokens}")
    was_training = model.training
    model.eval()
    rollouts: list[Rollout] = []
    try:
        with (torch.no_grad(), torch.random.fork_rng(enabled=seed is not None),
              tqdm(total=len(records), desc="rollout", unit="img", disable=not progress) as bar):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(records), cfg.batch_size):
                batch = [load_image(r) for r in records[start:start + cfg.batch_size]]
                rollouts += generate_batch(model, processor, batch, cfg, field_order)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return rollouts


def prompt_batch(processor, images: list[Image.Image], device, dtype) -> dict[str, torch.Tensor]:
    """The chat prompt with each image (RGB, as `load_image` reads it), left-padded into one
    batch."""
    prompt = Collator(processor).prompt_text()
    enc = processor(text=[prompt] * len(images), images=images, padding=True,
                    padding_side="left", return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


def generate_batch(model, processor, images: list[Image.Image], cfg: RolloutConfig,
                   field_order: str) -> list[Rollout]:
    """One batch of rollouts, one per image (greedy unless cfg.do_sample)."""
    tokenizer = processor.tokenizer
    table = token_table(tokenizer)
    inputs = prompt_batch(processor, images, model.device, model.dtype)
    recorder, constraint = LogprobRecorder(), None
    processors = [recorder]  # first, so it sees the raw logits
    if cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.constrained:
        vocab = model.get_output_embeddings().weight.shape[0]
        grammar = coordjson_grammar(tokenizer, field_order, vocab)
        constraint = GrammarProcessor(grammar, len(images), model.device)
        processors.append(constraint)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if cfg.do_sample else {}
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                           num_beams=1, repetition_penalty=1.0, use_cache=True,
                           eos_token_id=sorted(table.stop_ids),
                           pad_token_id=tokenizer.pad_token_id, **sampling)
    # each rank generates alone: weights are never sharded during rollouts (FSDP gathers them
    # first), so ranks need not step in lockstep as transformers assumes for FSDP models
    sequences = model.generate(**inputs, generation_config=gen, logits_processor=processors,
                               synced_gpus=False)
    if constraint is not None:
        constraint.check()
    new = sequences[:, inputs["input_ids"].shape[1]:]  # [B, T]
    logprobs = recorder.finish(sequences)  # [B, T]
    assert logprobs.shape == new.shape
    return [make_rollout(ids, lps, table)
            for ids, lps in zip(new.tolist(), logprobs.tolist(), strict=True)]


def make_rollout(ids: list[int], logprobs: list[float], table: TokenTable) -> Rollout:
    """Cut one generated row at its first end-of-turn token (the padding after it goes too)."""
    end = next((t for t, i in enumerate(ids) if i in table.stop_ids), len(ids))
    pieces = decode_pieces(ids[:end], table)
    return Rollout("".join(pieces), ids[:end], logprobs[:end], pieces, end == len(ids))
