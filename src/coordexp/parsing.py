"""Strict CoordJSON parser: model text -> valid objects, counted drops and char/token spans.

Bad model output is data, never an exception: every complete object is either kept or counted
under exactly one reason, and the append-ready prefix is located for Channel B.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from coordexp.codec import CoordCodec

REASONS = ("wrong_arity", "missing_desc", "unexpected_keys", "order_violation", "other")
FIELD_ORDERS = {"desc_first": ("desc", "bbox_2d"), "geometry_first": ("bbox_2d", "desc")}
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")

_WS = r"[ \t\n\r]*"
_STR = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_COORD = r"(<\|coord_\d+\|>)"
_BOX = r"\[" + _WS + (_WS + "," + _WS).join([_COORD] * 4) + _WS + r"\]"
_CONTAINER = re.compile(r"\{" + _WS + r'"objects"' + _WS + ":" + _WS + r"\[")
_SKIP_WS = re.compile(_WS)
_STRING = re.compile(_STR, re.S)
_STRUCT = re.compile(r'[{}"]')
_BRACKETS = re.compile(r'[\[\]{}"]')
_SCALAR = re.compile(r"[^,}]*")
_COORD_LITERAL = re.compile(r"<\|coord_\d+\|>")
# a well-formed object in each field order; anything else goes through the slow classifier
_FAST = {
    "desc_first": re.compile(
        r'\{' + _WS + r'"desc"' + _WS + ":" + _WS + f"({_STR})" + _WS + "," + _WS
        + r'"bbox_2d"' + _WS + ":" + _WS + _BOX + _WS + r"\}", re.S),
    "geometry_first": re.compile(
        r'\{' + _WS + r'"bbox_2d"' + _WS + ":" + _WS + _BOX + _WS + "," + _WS
        + r'"desc"' + _WS + ":" + _WS + f"({_STR})" + _WS + r"\}", re.S),
}
_CODEC = CoordCodec()

Span = tuple[int, int]


@dataclass(frozen=True)
class ObjectSpans:
    """Char spans of one kept object: the whole `{...}`, the desc text inside its quotes, and
    the 4 coord literals `<|coord_k|>`."""

    object: Span
    desc: Span
    coords: tuple[Span, Span, Span, Span]


@dataclass(frozen=True)
class ObjectTokens:
    """Token indices of one kept object: those overlapping its desc text, and its 4 coord tokens."""

    desc: list[int]
    coords: list[int]


@dataclass
class ParseResult:
    """Kept objects (`{"desc", "bbox_2d": [4 bins]}`, emission order) and counted drops.

    dropped_invalid counts every complete object that was not kept (ambiguous ones included);
    dropped_by_reason splits it. A broken array separator, a non-object element or a trailing
    key counts once as `other`, and so does every complete object after such a break: none is
    kept, since the append-ready prefix cannot reach past the break.
    prefix_end: text[:prefix_end] ends in `[` or right after the last kept object's `}`
    (None when invalid_rollout). The token fields are set by parse_coordjson_tokens only.
    """

    objects: list[dict] = field(default_factory=list)
    invalid_rollout: bool = False
    truncated: bool = False
    dropped_invalid: int = 0
    dropped_ambiguous: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    prefix_end: int | None = None
    spans: list[ObjectSpans] = field(default_factory=list)
    tokens: list[ObjectTokens] | None = None

    def drop(self, reason: str) -> None:
        self.dropped_invalid += 1
        self.dropped_by_reason[reason] += 1


def parse_coordjson(text: str, *, field_order: str = "desc_first") -> ParseResult:
    """Parse one rollout; never raises on model output."""
    return _parse(text, field_order)[0]


def _parse(text: str, field_order: str) -> tuple[ParseResult, int | None]:
    """The result and the offset just after the array's `[` (None without a container)."""
    if field_order not in FIELD_ORDERS:
        raise ValueError(f"field_order must be one of {sorted(FIELD_ORDERS)}, got {field_order!r}")
    text = cut_at_end_of_turn(text)
    result = ParseResult()
    opening = _CONTAINER.search(text)
    if opening is None:
        result.invalid_rollout = True
        return result, None
    result.prefix_end = opening.end()
    _scan_array(text, opening.end(), field_order, result)
    return result, opening.end()


def cut_at_end_of_turn(text: str) -> str:
    """The text before the first end-of-turn marker (the whole text if there is none)."""
    cut = min((i for i in (text.find(m) for m in END_OF_TURN) if i >= 0), default=len(text))
    return text[:cut]


def _scan_array(text: str, pos: int, field_order: str, result: ParseResult) -> None:
    """Walk the elements of the objects array from just after its `[`."""
    pos = _skip_ws(text, pos)
    if text.startswith("]", pos):
        _close_container(text, pos + 1, result)
        return
    while True:
        if pos >= len(text):
            result.truncated = True
            return
        if text[pos] != "{":  # a non-object element: the rest of the container is junk
            result.drop("other")
            _count_after_break(text, pos, result)
            return
        end = _read_object(text, pos, field_order, result)
        if end is None:  # the last object runs off the end: cut it, keep the complete ones
            result.truncated = True
            return
        pos = _skip_ws(text, end)
        if pos >= len(text):
            result.truncated = True
            return
        if text[pos] == "]":
            _close_container(text, pos + 1, result)
            return
        if text[pos] != ",":
            result.drop("other")
            _count_after_break(text, pos, result)
            return
        pos = _skip_ws(text, pos + 1)


def _count_after_break(text: str, pos: int, result: ParseResult) -> None:
    """Count every complete object left among the array's elements as dropped (`other`)."""
    depth = 0  # of nested arrays: objects inside them are not elements
    while (m := _BRACKETS.search(text, pos)) is not None:
        c, pos = m.group(), m.end()
        if c == '"':
            s = _STRING.match(text, m.start())
            if s is None:
                return
            pos = s.end()
        elif c == "{":
            end = _find_object_end(text, m.start())
            if end is None:
                return
            if depth == 0:
                result.drop("other")
            pos = end
        elif c == "[":
            depth += 1
        elif depth == 0:  # the array or the container closes
            return
        elif c == "]":
            depth -= 1


def _close_container(text: str, pos: int, result: ParseResult) -> None:
    """After the array's `]` only `}` closes the container; a `,` starts a second top-level key."""
    pos = _skip_ws(text, pos)
    if pos >= len(text):
        result.truncated = True
    elif text[pos] != "}":
        result.drop("other")


def _read_object(text: str, start: int, field_order: str, result: ParseResult) -> int | None:
    """Keep or drop the object starting at `start`; its end offset, or None if it never closes."""
    m = _FAST[field_order].match(text, start)
    if m is not None and _keep_fast(m, field_order, result):
        return m.end()
    end = _find_object_end(text, start)
    if end is not None:
        result.drop(_classify(text, start, end, field_order))
    return end


def _keep_fast(m: re.Match, field_order: str, result: ParseResult) -> bool:
    """Keep a regex-matched object if its desc decodes non-empty and its bins are in range."""
    desc_group, coord_groups = (1, range(2, 6)) if field_order == "desc_first" else (5, range(1, 5))
    desc = _decode_string(m.group(desc_group))
    bins = [_CODEC.parse_token(m.group(g)) for g in coord_groups]
    if desc is None or not desc.strip() or None in bins:
        return False
    desc = desc.strip()  # "  cat " is the category "cat"; the span keeps the raw text
    ds, de = m.span(desc_group)
    spans = tuple(m.span(g) for g in coord_groups)
    result.objects.append({"desc": desc, "bbox_2d": bins})
    result.spans.append(ObjectSpans((m.start(), m.end()), (ds + 1, de - 1), spans))
    result.prefix_end = m.end()
    return True


def _find_object_end(text: str, start: int) -> int | None:
    """Offset just past the `}` balancing the `{` at start (strings honoured), else None."""
    depth, pos = 0, start
    while (m := _STRUCT.search(text, pos)) is not None:
        if m.group() == '"':
            s = _STRING.match(text, m.start())
            if s is None:
                return None
            pos = s.end()
            continue
        depth += 1 if m.group() == "{" else -1
        pos = m.end()
        if depth == 0:
            return pos
    return None


def _classify(text: str, start: int, end: int, field_order: str) -> str:
    """The reason a balanced object is invalid; with several violations the first of
    other > unexpected_keys > missing_desc > wrong_arity > order_violation wins."""
    members = _read_members(text, start, end)
    if members is None:
        return "other"
    keys = [k for k, _ in members]
    if any(k not in ("desc", "bbox_2d") for k in keys) or keys.count("bbox_2d") != 1:
        return "unexpected_keys"
    values = dict(members)
    if keys.count("desc") != 1 or not _is_desc(values["desc"]):
        return "missing_desc"
    if not _is_box(values["bbox_2d"]):
        return "wrong_arity"
    if tuple(keys) != FIELD_ORDERS[field_order]:
        return "order_violation"
    return "other"  # valid per member but the fast form rejected it (e.g. odd whitespace)


def _read_members(text: str, start: int, end: int) -> list[tuple[str, str]] | None:
    """`{"key": value, ...}` between start and end -> [(key, raw value text)]; None if malformed."""
    members, pos, last = [], _skip_ws(text, start + 1), end - 1
    while pos < last:
        key = _STRING.match(text, pos, last)
        name = _decode_string(key.group()) if key else None
        if name is None:
            return None
        pos = _skip_ws(text, key.end())
        if not text.startswith(":", pos):
            return None
        vstart = _skip_ws(text, pos + 1)
        vend = _value_end(text, vstart, last)
        if vend is None:
            return None
        members.append((name, text[vstart:vend].rstrip(" \t\n\r")))
        pos = _skip_ws(text, vend)
        if pos < last and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            if pos >= last:  # trailing comma
                return None
        elif pos < last:
            return None
    return members


def _value_end(text: str, pos: int, last: int) -> int | None:
    """End of the JSON-ish value starting at pos (strings, nested [] and {} honoured)."""
    if pos >= last:
        return None
    if text[pos] == '"':
        m = _STRING.match(text, pos, last)
        return m.end() if m else None
    if text[pos] in "[{":
        return _find_bracket_end(text, pos, last)
    return _SCALAR.match(text, pos, last).end()


def _find_bracket_end(text: str, start: int, last: int) -> int | None:
    depth, pos = 0, start
    while (m := _BRACKETS.search(text, pos, last)) is not None:
        c = m.group()
        if c == '"':
            s = _STRING.match(text, m.start(), last)
            if s is None:
                return None
            pos = s.end()
            continue
        depth += 1 if c in "[{" else -1
        pos = m.end()
        if depth == 0:
            return pos
    return None


def _is_desc(raw: str) -> bool:
    desc = _decode_string(raw) if raw.startswith('"') else None
    return desc is not None and bool(desc.strip())


def _is_box(raw: str) -> bool:
    """Exactly 4 bare, in-range coord literals in a flat array."""
    if not (raw.startswith("[") and raw.endswith("]")):
        return False
    items = [s.strip(" \t\n\r") for s in raw[1:-1].split(",")]
    return len(items) == 4 and all(
        _COORD_LITERAL.fullmatch(s) and _CODEC.parse_token(s) is not None for s in items)


def _decode_string(literal: str) -> str | None:
    if "\\" not in literal:
        return literal[1:-1]
    try:
        value = json.loads(literal)
    except json.JSONDecodeError:  # a bad escape: malformed, not an exception for the caller
        return None
    return value if isinstance(value, str) else None


def _skip_ws(text: str, pos: int) -> int:
    return _SKIP_WS.match(text, pos).end()


def parse_coordjson_tokens(pieces: list[str], *, field_order: str = "desc_first") -> ParseResult:
    """Parse the decoded pieces of generated tokens (their concatenation is the text).

    Adds per kept object the token indices of its desc and of its 4 coord values; an object
    whose coord literal is not exactly one token is dropped as ambiguous (reason wrong_arity).
    """
    result, array_open = _parse("".join(pieces), field_order)
    starts = _piece_starts(pieces)  # [T + 1] char offset where each token starts, then the end
    kept = []
    for obj, sp in zip(result.objects, result.spans, strict=True):
        coords = [_exact_token(starts, s) for s in sp.coords]
        if None in coords:
            result.drop("wrong_arity")
            result.dropped_ambiguous += 1
        else:
            kept.append((obj, sp, ObjectTokens(_overlapping(starts, sp.desc), coords)))
    if len(kept) < len(result.objects):
        result.objects = [o for o, _, _ in kept]
        result.spans = [s for _, s, _ in kept]
        result.prefix_end = result.spans[-1].object[1] if kept else array_open
    result.tokens = [t for _, _, t in kept]
    return result


def _piece_starts(pieces: list[str]) -> list[int]:
    return [0, *accumulate(map(len, pieces))]


def _exact_token(starts: list[int], span: Span) -> int | None:
    """The index of the one token whose text is exactly span, else None."""
    i = bisect_right(starts, span[0]) - 1  # the last token starting at or before span[0]
    if i < 0 or i >= len(starts) - 1 or starts[i] != span[0] or starts[i + 1] != span[1]:
        return None
    return i


def _overlapping(starts: list[int], span: Span) -> list[int]:
    """Indices of tokens whose char range overlaps span (half-open)."""
    first = bisect_right(starts, span[0]) - 1
    last = bisect_left(starts, span[1])  # tokens starting before span end
    candidates = range(max(first, 0), min(last, len(starts) - 1))
    return [i for i in candidates if starts[i + 1] > starts[i]]
