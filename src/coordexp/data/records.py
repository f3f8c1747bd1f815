"""The JSONL record schema (one image per line, pixel boxes), its reader, writer and validation.

A record line: {"images": ["rel/path.png"], "width": W, "height": H,
                "objects": [{"desc": str, "bbox_2d": [x1, y1, x2, y2]}, ...]}
Boxes are pixels of that image; "<|coord_k|>" strings are accepted and converted to pixels.
An object may carry "difficult": true (Pascal VOC's flag, kept for the record; trained and
scored as any object). Any other object key is an error; other record keys are kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from coordexp.codec import CoordCodec
from coordexp.data.images import check_image
from coordexp.errors import UserError
from coordexp.files import parse_json, read_text, write_text_atomic

REQUIRED_KEYS = ("images", "width", "height", "objects")
MAX_SIDE = 1 << 24  # pixels; a larger width or height is a typo, not an image
OBJECT_KEYS = ("desc", "bbox_2d", "difficult")


@dataclass(frozen=True)
class DetObject:
    desc: str
    box_px: tuple[float, float, float, float]  # xyxy, pixels
    difficult: bool = False


@dataclass(frozen=True)
class Record:
    image: str  # path as written in the file (relative to the JSONL's folder)
    width: int
    height: int
    objects: tuple[DetObject, ...]
    root: Path = Path(".")  # folder of the JSONL file
    extra: dict = field(default_factory=dict, compare=False)  # other keys, kept on write
    where: str = field(default="", compare=False)  # "file:line" it was read from, for errors

    @property
    def image_path(self) -> Path:
        return self.root / self.image

    def to_json(self) -> dict:
        objs = [{"desc": o.desc, "bbox_2d": [_num(v) for v in o.box_px]}
                | ({"difficult": True} if o.difficult else {}) for o in self.objects]
        return {"images": [self.image], "width": self.width, "height": self.height,
                "objects": objs, **self.extra}


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(float(v), 3)


def parse_record(obj: object, where: str, root: Path, codec: CoordCodec) -> Record:
    """Validate one decoded JSON value; `where` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a record must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    images, w, h = obj["images"], obj["width"], obj["height"]
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)
            and images[0].strip() and "\0" not in images[0]):
        raise UserError(f"{where}: 'images' must be a list with exactly one path")
    for key, v in (("width", w), ("height", h)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_SIDE:
            raise UserError(f"{where}: '{key}' must be a positive integer (at most "
                            f"{MAX_SIDE}), got {_short(v)}")
    if not isinstance(obj["objects"], list):
        raise UserError(f"{where}: 'objects' must be a list")
    objects = tuple(_parse_object(o, f"{where}: object {i}", w, h, codec)
                    for i, o in enumerate(obj["objects"]))
    extra = {k: v for k, v in obj.items() if k not in REQUIRED_KEYS}
    return Record(images[0], w, h, objects, root, extra, where)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_object(o: object, where: str, w: int, h: int, codec: CoordCodec) -> DetObject:
    if not isinstance(o, dict) or "desc" not in o or "bbox_2d" not in o:
        raise UserError(f"{where}: needs 'desc' and 'bbox_2d'")
    unknown = [k for k in o if k not in OBJECT_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (an object holds 'desc', "
                        "'bbox_2d' and optionally 'difficult'; other geometry is not supported)")
    if not isinstance(o.get("difficult", False), bool):
        raise UserError(f"{where}: 'difficult' must be true or false")
    desc = o["desc"]
    if not isinstance(desc, str) or not desc.strip():
        raise UserError(f"{where}: 'desc' must be a non-empty string")
    if any(c in desc for c in "\n\r\t"):
        raise UserError(f"{where}: 'desc' {_short(desc)} contains a newline or tab")
    box = o["bbox_2d"]
    if not isinstance(box, list) or len(box) != 4:
        raise UserError(f"{where}: 'bbox_2d' must be [x1, y1, x2, y2]")
    if all(isinstance(v, str) for v in box):
        bins = [codec.parse_token(v) for v in box]
        if None in bins:
            raise UserError(f"{where}: 'bbox_2d' {box} has an invalid coord token")
        box = codec.box_bins_to_px(bins, w, h)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        raise UserError(f"{where}: 'bbox_2d' {_short(box)} must hold 4 numbers or 4 coord "
                        "tokens")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except OverflowError:
        raise UserError(f"{where}: 'bbox_2d' {_short(box)} has a number too large") from None
    finite = all(map(math.isfinite, (x1, y1, x2, y2)))
    if not (finite and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise UserError(
            f"{where}: box {_short(box)} is outside the {w}x{h} image or has x2<=x1 / y2<=y1"
        )
    return DetObject(desc, (x1, y1, x2, y2), o.get("difficult", False))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header; an unreadable file is a UserError."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: cannot read the image ({e})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[object, str]]:
    """The decoded JSON value of every non-blank line, with its "file:line"; non-UTF-8 bytes,
    malformed JSON, over-long integers and deep nesting are errors naming the line."""
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            where = f"{path}:{lineno}"
            yield parse_json(line, where), where


def read_records(path: str | Path, *, check_images: bool = True,
                 codec: CoordCodec | None = None) -> list[Record]:
    """Read and validate a JSONL file; any problem raises UserError naming file and line.
    check_images: every image exists, its header reads and its size is the record's."""
    codec, records = codec or CoordCodec(), []
    for obj, where in iter_jsonl(path):
        rec = parse_record(obj, where, Path(path).parent, codec)
        if check_images:
            check_image(rec.image_path, rec.width, rec.height, where)
        records.append(rec)
    return records


def write_records(path: str | Path, records: list[Record]) -> None:
    """Write records as JSONL (atomically: a temporary file renamed into place)."""
    write_text_atomic(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n"
                                    for r in records))
