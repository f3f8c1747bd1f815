"""CoordJSON: the assistant text the model learns to write, and the chat messages around it.

`{"objects": [{"desc": "red circle", "bbox_2d": [<|coord_12|>, <|coord_40|>, ...]}, ...]}`:
one line, objects sorted by the (y1, x1) anchor, coord tokens written bare (unquoted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from coordexp.codec import CoordCodec
from coordexp.data.records import Record

FIELD_ORDERS = ("desc_first", "geometry_first")
SYSTEM_PROMPT = "You are a detector. Answer with one CoordJSON line."
USER_PROMPT = (
    'Detect every object. Reply {"objects": [{"desc": ..., "bbox_2d": [x1, y1, x2, y2]}]} '
    "with coord tokens, sorted top-to-bottom then left-to-right."
)


def render_object(desc: str, box_bins: Sequence[int], codec: CoordCodec, field_order: str) -> str:
    """One object record, e.g. '{"desc": "cat", "bbox_2d": [<|coord_1|>, ...]}'."""
    coords = ", ".join(codec.token(int(k)) for k in box_bins)
    desc_part = f'"desc": {json.dumps(desc, ensure_ascii=False)}'
    geom_part = f'"bbox_2d": [{coords}]'
    if field_order == "desc_first":
        return "{" + desc_part + ", " + geom_part + "}"
    if field_order == "geometry_first":
        return "{" + geom_part + ", " + desc_part + "}"
    raise ValueError(f"field_order must be one of {FIELD_ORDERS}, got {field_order!r}")


def sorted_objects_bins(record: Record, codec: CoordCodec) -> list[tuple[str, list[int]]]:
    """(desc, bins) of every object, in the canonical (y1, x1) order."""
    objs = [(o.desc, codec.box_px_to_bins(o.box_px, record.width, record.height))
            for o in record.objects]
    return sorted(objs, key=lambda o: (o[1][1], o[1][0]))


def render_answer(objects: Sequence[tuple[str, Sequence[int]]], codec: CoordCodec,
                  field_order: str = "desc_first") -> str:
    """The full answer for (desc, bins) objects, in the order given."""
    body = ", ".join(render_object(d, b, codec, field_order) for d, b in objects)
    return '{"objects": [' + body + "]}"


def render_record(record: Record, codec: CoordCodec, field_order: str = "desc_first") -> str:
    return render_answer(sorted_objects_bins(record, codec), codec, field_order)


def build_messages(answer: str | None = None) -> list[dict]:
    """Chat messages: system, user (image + prompt), and the assistant answer when given."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER_PROMPT}]},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
