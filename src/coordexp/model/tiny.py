"""Tiny offline VLMs: a byte-level BPE trained here with the Qwen-VL specials and a chat template,
and tiny random Qwen2.5-VL / Qwen3-VL models built from configs (no downloads)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from coordexp.codec import TOKEN_RE, CoordCodec
from coordexp.data.render import SYSTEM_PROMPT, USER_PROMPT, render_object
from coordexp.data.synthetic import COLOURS, SHAPES
from coordexp.model.tokenizer import as_hf_tokenizer

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

EXTRA_WORDS = ("person book chair bed cup bottle car dog cat bird potted plant table tv laptop "
               "unknown object the a of and with left right top bottom").split()


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Text the tokenizer learns merges from: prompts and answers with the coord tokens cut out."""
    rng = random.Random(seed)
    codec = CoordCodec()
    descs = [f"{c} {s}" for c in COLOURS for s in SHAPES] + EXTRA_WORDS
    lines = [SYSTEM_PROMPT, USER_PROMPT] * 50
    for _ in range(n):
        objs = [render_object(rng.choice(descs), [rng.randrange(1000) for _ in range(4)], codec,
                              rng.choice(("desc_first", "geometry_first")))
                for _ in range(rng.randint(0, 4))]
        text = '{"objects": [' + ", ".join(objs) + "]}"
        lines += [p for p in TOKEN_RE.split(text) if p and not p.isdigit()]
    return lines


def build_tiny_tokenizer(vocab_size: int = 1200) -> T.PreTrainedTokenizerFast:
    """A byte-level BPE (no regex pre-split, so JSON punctuation merges into few tokens)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(_corpus(), trainer)
    return as_hf_tokenizer(tok, CHAT_TEMPLATE)


@dataclass(frozen=True)
class TinySpec:
    family: str = "qwen2_5_vl"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_depth: int = 2
    vision_width: int = 64
    tie_word_embeddings: bool = True


def tiny_config(tok, spec: TinySpec) -> T.PretrainedConfig:
    """A Qwen-VL config of the given size whose special ids point into `tok`."""
    head_dim = spec.hidden // spec.heads
    assert head_dim % 8 == 0, "M-RoPE sections need head_dim divisible by 8"
    quarter = head_dim // 8
    text = dict(vocab_size=((len(tok) + 63) // 64) * 64, hidden_size=spec.hidden,
                intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                max_position_embeddings=4096, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id, bos_token_id=None,
                tie_word_embeddings=spec.tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                 "mrope_section": [2 * quarter, quarter, quarter]})
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
               tie_word_embeddings=spec.tie_word_embeddings)
    vw = spec.vision_width
    if spec.family == "qwen2_5_vl":
        vision = dict(depth=spec.vision_depth, hidden_size=vw, intermediate_size=2 * vw,
                      num_heads=4, out_hidden_size=spec.hidden, patch_size=14, window_size=112,
                      fullatt_block_indexes=[spec.vision_depth - 1])
        return T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if spec.family == "qwen3_vl":
        vision = dict(depth=spec.vision_depth, hidden_size=vw, intermediate_size=2 * vw,
                      num_heads=4, out_hidden_size=spec.hidden, patch_size=16,
                      num_position_embeddings=576, deepstack_visual_indexes=[spec.vision_depth - 1])
        text = dict(text, head_dim=head_dim)
        return T.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"family must be one of {FAMILIES}, got {spec.family!r}")


def build_tiny_model(tok, spec: TinySpec, seed: int = 0):
    """A randomly initialised tiny VLM (deterministic given the seed)."""
    import torch

    torch.manual_seed(seed)
    return T.AutoModelForImageTextToText.from_config(tiny_config(tok, spec))
