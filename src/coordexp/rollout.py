"""Batched rollouts with the HF model (left-padded prompts with images, KV cache, stop at end of
turn, raw token log-probs), an optional CoordJSON grammar as a logits processor, predictions
with box scores, and `coordexp infer`.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import GenerationConfig, LogitsProcessor, RepetitionPenaltyLogitsProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from coordexp.codec import CoordCodec
from coordexp.config import Config, DataConfig, RolloutConfig
from coordexp.data.collate import Collator, load_image
from coordexp.data.records import Record, read_records
from coordexp.data.render import render_answer, render_object
from coordexp.errors import UserError
from coordexp.eval.scores import box_scores
from coordexp.model.qwen_vl import load_vlm
from coordexp.parsing import END_OF_TURN, ParseResult, parse_coordjson_tokens

FUSED_DESC_WEIGHT = 0.5  # eval.score = fused: (1 - w) * coord geometric mean + w * desc prob
COORD, STOP = 256, 257  # grammar symbols beside the 256 byte values
DESC_MARK = "\u00a7"  # a placeholder desc, to cut the renderer's output into grammar segments


@dataclass
class Rollout:
    """One generated answer; every per-token list covers the tokens before the end of turn."""

    text: str  # == "".join(pieces)
    token_ids: list[int]
    token_logprobs: list[float]  # log-prob of each token under the raw (unprocessed) model
    pieces: list[str]  # decoded text of each token
    hit_max_new_tokens: bool  # stopped by the budget, not by an end-of-turn token


# -- token bytes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenTable:
    """What each token id writes, as bytes (byte-level BPE; added tokens write their text)."""

    token_bytes: tuple[bytes, ...]
    added_ids: frozenset[int]  # specials and coord tokens: never free text for the grammar
    coord_ids: frozenset[int]
    stop_ids: frozenset[int]  # end of turn


@lru_cache(maxsize=4)  # per tokenizer object: add tokens before the first rollout, not after
def token_table(tokenizer) -> TokenTable:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = []
    for i, tok in enumerate(vocab):
        if i in added:
            out.append(added[i].encode())
        elif tok is None or any(c not in byte_of for c in tok):
            raise UserError(f"token {i} ({tok!r}) is not byte-level BPE; rollouts need a "
                            "Qwen-style byte-level tokenizer")
        else:
            out.append(bytes(byte_of[c] for c in tok))
    stops = frozenset(tokenizer.convert_tokens_to_ids(list(END_OF_TURN)))
    coords = frozenset(CoordCodec().token_ids(tokenizer))
    return TokenTable(tuple(out), frozenset(added), coords, stops)


def decode_pieces(ids: list[int], table: TokenTable) -> list[str]:
    """Text of each token, UTF-8 sequences split across tokens completed where they end."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    size = len(table.token_bytes)
    pieces = [decoder.decode(table.token_bytes[i] if i < size else b"") for i in ids]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return pieces


# -- the CoordJSON grammar -------------------------------------------------------------------
def grammar_segments(field_order: str) -> tuple[bytes, list, bytes, bytes]:
    """(container open, object segments, separator, container close), cut from the renderer's
    own output; object segments are literal bytes, "desc" (a string body) or COORD."""
    codec = CoordCodec()
    coord = codec.token(0)
    obj = render_object(DESC_MARK, [0, 0, 0, 0], codec, field_order)
    parts = re.split(f"({DESC_MARK}|{re.escape(coord)})", obj)
    segments = [COORD if p == coord else "desc" if p == DESC_MARK else p.encode()
                for p in parts if p]
    open_, sep, close = render_answer([(DESC_MARK, [0] * 4)] * 2, codec, field_order).split(obj)
    return open_.encode(), segments, sep.encode(), close.encode()


class Dfa:
    """A deterministic automaton over byte values, COORD and STOP; state 0 is the start."""

    def __init__(self):
        self.edges: list[dict[int, int]] = [{}]

    def state(self) -> int:
        self.edges.append({})
        return len(self.edges) - 1

    def edge(self, src: int, symbol: int, dst: int | None = None) -> int:
        assert symbol not in self.edges[src], "the grammar must stay deterministic"
        self.edges[src][symbol] = self.state() if dst is None else dst
        return self.edges[src][symbol]

    def literal(self, src: int, text: bytes, dst: int | None = None) -> int:
        for i, b in enumerate(text):
            src = self.edge(src, b, dst if i == len(text) - 1 else None)
        return src

    def desc(self, src: int) -> int:
        """A JSON string body of UTF-8 text with at least one non-space character (the next
        literal starts with the closing quote); escapes `\\"` and `\\\\` only, as rendered
        descs hold no other."""
        blank, content, escape = src, self.state(), self.state()
        one, two, three = self.state(), self.state(), self.state()  # continuation bytes due
        for b in range(0x80, 0xC0):
            self.edges[one][b], self.edges[two][b], self.edges[three][b] = content, one, two
        for state in (blank, content):
            edges = self.edges[state]
            edges.update({b: content for b in range(0x21, 0x80) if b not in b'"\\'})
            edges.update({b: one for b in range(0xC2, 0xE0)})
            edges.update({b: two for b in range(0xE0, 0xF0)})
            edges.update({b: three for b in range(0xF0, 0xF5)})
            edges[0x5C] = escape
        self.edges[blank][0x20], self.edges[content][0x20] = blank, content
        self.edges[escape][0x22] = self.edges[escape][0x5C] = content
        return content

    def walk(self, state: int, symbols) -> int:
        for s in symbols:
            state = self.edges[state].get(s, -1)
            if state < 0:
                break
        return state


def build_coordjson_dfa(field_order: str) -> tuple[Dfa, int]:
    """Canonical CoordJSON then one end-of-turn; returns the automaton and its final state."""
    open_, segments, sep, close = grammar_segments(field_order)
    dfa = Dfa()
    after_open, obj_start = dfa.literal(0, open_), dfa.state()
    state = obj_start
    for seg in segments:
        state = (dfa.desc(state) if seg == "desc" else dfa.edge(state, COORD) if seg == COORD
                 else dfa.literal(state, seg))
    dfa.edges[after_open].update(dfa.edges[obj_start])  # `[` may open the first object...
    done = dfa.literal(after_open, close)  # ...or close an empty array
    dfa.literal(state, close, done)
    dfa.literal(state, sep, obj_start)
    return dfa, dfa.edge(done, STOP)


class CoordJsonGrammar:
    """Which token ids may come next in each automaton state, for one tokenizer and vocabulary:
    `allowed` [S, V] bool (all True in the final state) and `next_state` [S, V] (-1: invalid)."""

    def __init__(self, tokenizer, field_order: str, vocab_size: int):
        self.dfa, self.final = build_coordjson_dfa(field_order)
        t = token_table(tokenizer)
        symbols = [(COORD,) if i in t.coord_ids else (STOP,) if i in t.stop_ids
                   else () if i in t.added_ids else b for i, b in enumerate(t.token_bytes)]
        by_first: dict[int, list[int]] = {}
        for i, sym in enumerate(symbols):
            if sym:
                by_first.setdefault(sym[0], []).append(i)
        next_state = np.full((len(self.dfa.edges), vocab_size), -1, dtype=np.int32)
        for state, edges in enumerate(self.dfa.edges):
            for first, dst in edges.items():
                for i in by_first.get(first, ()):
                    next_state[state, i] = self.dfa.walk(dst, symbols[i][1:])
        next_state[self.final] = self.final  # after the end of turn: padding, unconstrained
        self.next_state = torch.from_numpy(next_state)  # [S, V]
        self.allowed = self.next_state >= 0  # [S, V]


@lru_cache(maxsize=4)
def coordjson_grammar(tokenizer, field_order: str, vocab_size: int) -> CoordJsonGrammar:
    return CoordJsonGrammar(tokenizer, field_order, vocab_size)


class GrammarProcessor(LogitsProcessor):
    """Masks every token the CoordJSON grammar does not allow next; one automaton state per
    row, advanced on the device (no host sync per step)."""

    def __init__(self, grammar: CoordJsonGrammar, batch_size: int, device: torch.device):
        self.next_state = grammar.next_state.to(device)  # [S, V]
        self.allowed = grammar.allowed.to(device)  # [S, V]
        self.states = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.escaped = torch.zeros(batch_size, dtype=torch.bool, device=device)  # [B]
        self.started = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.started:  # the last column is the token chosen at the previous step
            self.states = self.next_state[self.states, input_ids[:, -1]].long()
            self.escaped |= self.states < 0  # impossible under the mask; checked once at the end
        self.started = True
        return scores.masked_fill(~self.allowed[self.states], float("-inf"))

    def check(self) -> None:
        assert not self.escaped.any(), "a token outside the grammar was chosen"


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
                batch = records[start:start + cfg.batch_size]
                rollouts += generate_batch(model, processor, batch, cfg, field_order)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return rollouts


def prompt_batch(processor, records: list[Record], device, dtype) -> dict[str, torch.Tensor]:
    """The chat prompt with each record's image, left-padded into one batch."""
    prompt = Collator(processor).prompt_text()
    enc = processor(text=[prompt] * len(records), images=[load_image(r) for r in records],
                    padding=True, padding_side="left", return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


def generate_batch(model, processor, records: list[Record], cfg: RolloutConfig,
                   field_order: str) -> list[Rollout]:
    tokenizer = processor.tokenizer
    table = token_table(tokenizer)
    inputs = prompt_batch(processor, records, model.device, model.dtype)
    recorder, constraint = LogprobRecorder(), None
    processors = [recorder]  # first, so it sees the raw logits
    if cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.constrained:
        vocab = model.get_output_embeddings().weight.shape[0]
        grammar = coordjson_grammar(tokenizer, field_order, vocab)
        constraint = GrammarProcessor(grammar, len(records), model.device)
        processors.append(constraint)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if cfg.do_sample else {}
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                           num_beams=1, repetition_penalty=1.0, use_cache=True,
                           eos_token_id=sorted(table.stop_ids),
                           pad_token_id=tokenizer.pad_token_id, **sampling)
    sequences = model.generate(**inputs, generation_config=gen, logits_processor=processors)
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


# -- predictions and `coordexp infer` -------------------------------------------------------
def predict_records(model, processor, records: list[Record], cfg: Config, *,
                    progress: bool = True) -> list[dict]:
    """Rollout -> token-aligned parse -> box scores -> one `coordexp eval` line per record:
    {"images", "width", "height", "objects": [{"desc", "bbox_2d" (pixels xyxy), "score"}],
     "raw_text", "parse_invalid_rollout", "parse_truncated", "parse_dropped_invalid",
     "parse_dropped_ambiguous", "parse_dropped_<reason>" (counts)}."""
    rollouts = generate_rollouts(model, processor, records, cfg.rollout, progress=progress,
                                 seed=cfg.training.seed, field_order=cfg.data.field_order)
    return [prediction(r, ro, cfg) for r, ro in zip(records, rollouts, strict=True)]


def prediction(record: Record, rollout: Rollout, cfg: Config) -> dict:
    result = parse_coordjson_tokens(rollout.pieces, field_order=cfg.data.field_order)
    scores = object_scores(rollout, result, cfg.eval.score)
    codec = CoordCodec()
    objects = [{"desc": o["desc"], "score": s,
                "bbox_2d": codec.box_bins_to_px(o["bbox_2d"], record.width, record.height)}
               for o, s in zip(result.objects, scores, strict=True)]
    parse = {"parse_invalid_rollout": int(result.invalid_rollout),
             "parse_truncated": int(result.truncated),
             "parse_dropped_invalid": result.dropped_invalid,
             "parse_dropped_ambiguous": result.dropped_ambiguous}
    parse |= {f"parse_dropped_{k}": v for k, v in result.dropped_by_reason.items()}
    return {"images": [record.image], "width": record.width, "height": record.height,
            "objects": objects, "raw_text": rollout.text} | parse


def object_scores(rollout: Rollout, result: ParseResult, score: str) -> list[float]:
    """eval.score: coord_prob | fused | constant (1.0: AP then follows emission order)."""
    if score == "constant":
        return [1.0] * len(result.objects)
    weight = FUSED_DESC_WEIGHT if score == "fused" else 0.0
    return box_scores(rollout.token_logprobs, result.tokens, desc_weight=weight)


def infer_command(model_dir: str | Path, data_path: str | Path, out_path: str | Path, *,
                  batch_size: int, max_new_tokens: int, constrained: bool,
                  field_order: str = "desc_first") -> int:
    """`coordexp infer`: rollouts on every record -> predictions JSONL (written atomically).
    `field_order` must be the one the model was trained with: the grammar and parser use it."""
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError(f"--batch-size and --max-new-tokens must be >= 1, got {batch_size} and "
                        f"{max_new_tokens}")
    records = read_records(data_path)
    model, processor, _ = load_vlm(model_dir)
    cfg = Config(data=DataConfig(field_order=field_order),
                 rollout=RolloutConfig(batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       constrained=constrained))
    preds = predict_records(model, processor, records, cfg)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for pred in preds:
            f.write(json.dumps(pred, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(summary_line(preds, out))
    return 0


def summary_line(preds: list[dict], out: Path) -> str:
    return (f"wrote {len(preds)} predictions ({sum(len(p['objects']) for p in preds)} objects) "
            f"to {out}; invalid rollouts {sum(p['parse_invalid_rollout'] for p in preds)}, "
            f"truncated {sum(p['parse_truncated'] for p in preds)}, "
            f"dropped objects {sum(p['parse_dropped_invalid'] for p in preds)}")
