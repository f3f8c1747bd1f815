"""The CoordJSON grammar for generation: what each token id writes (byte-level BPE), a
deterministic automaton over bytes and coord slots cut from the renderer's own output, and the
logits processor that masks every token the grammar does not allow next.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from transformers import LogitsProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from coordexp.codec import CoordCodec
from coordexp.data.render import render_answer, render_object
from coordexp.errors import UserError
from coordexp.parsing import END_OF_TURN

COORD, STOP = 256, 257  # grammar symbols beside the 256 byte values
DESC_MARK = "\u00a7"  # a placeholder desc, to cut the renderer's output into grammar segments


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
