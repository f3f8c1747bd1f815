"""ODVG (the Grounding-DINO JSONL of detection and grounding data) -> records.

A line: {"filename": "a.jpg", "width": W, "height": H, and either
  "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label": int, "category": str}]} or
  "grounding": {"caption": str, "regions": [{"bbox": [x1, y1, x2, y2], "phrase": str}]}}.
Boxes are pixels. A detection desc is `category`, else `label` looked up in the label map
(JSON {"0": "person", ...}); a grounding desc is the region's `phrase`, and the caption stays
on the record as `caption`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from coordexp.data.coco import load_json
from coordexp.data.records import DetObject, Record, iter_jsonl
from coordexp.errors import UserError


def odvg_to_records(path: Path, images_dir: Path, out_dir: Path, *,
                    label_map: dict[str, str] | None = None) -> tuple[list[Record], Counter]:
    """Convert every line of an ODVG file; returns records and counts of what was skipped
    (none: every problem is an error)."""
    return [_convert(obj, where, images_dir, out_dir, label_map or {})
            for obj, where in iter_jsonl(path)], Counter()


def read_label_map(path: Path) -> dict[str, str]:
    labels = load_json(path)
    if not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
        raise UserError(f"{path}: a label map is a JSON object {{\"0\": \"name\", ...}}")
    return labels


def _convert(obj: object, where: str, images_dir: Path, out_dir: Path,
             label_map: dict[str, str]) -> Record:
    if not isinstance(obj, dict) or not all(k in obj for k in ("filename", "width", "height")):
        raise UserError(f"{where}: needs 'filename', 'width' and 'height'")
    w, h = obj["width"], obj["height"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise UserError(f"{where}: 'width' and 'height' must be positive integers")
    kinds = [k for k in ("detection", "grounding") if k in obj]
    if len(kinds) != 1:
        raise UserError(f"{where}: needs exactly one of 'detection' and 'grounding'")
    image = images_dir / obj["filename"]
    if not image.is_file():
        raise UserError(f"{where}: image {image} not found")
    kind = kinds[0]
    section = obj[kind]
    items = _list(section, "instances" if kind == "detection" else "regions", where)
    objects = []
    for i, o in enumerate(items):
        at = f"{where}: {'instance' if kind == 'detection' else 'region'} {i}"
        desc = _category(o, label_map, at) if kind == "detection" else _phrase(o, at)
        objects.append(DetObject(desc, _box(o, w, h, at)))
    extra = {"caption": section["caption"]} if kind == "grounding" and "caption" in section else {}
    return Record(os.path.relpath(image, out_dir), w, h, tuple(objects), out_dir, extra)


def _list(section: object, key: str, where: str) -> list:
    if not (isinstance(section, dict) and isinstance(section.get(key), list)):
        raise UserError(f"{where}: needs a list '{key}'")
    return section[key]


def _category(o: object, label_map: dict[str, str], where: str) -> str:
    if isinstance(o, dict) and isinstance(o.get("category"), str) and o["category"].strip():
        return o["category"]
    label = o.get("label") if isinstance(o, dict) else None
    if str(label) in label_map:
        return label_map[str(label)]
    raise UserError(f"{where}: needs a 'category' name, or a 'label' the label map names "
                    f"(got label {label!r}; pass --label-map)")


def _phrase(o: object, where: str) -> str:
    if not (isinstance(o, dict) and isinstance(o.get("phrase"), str) and o["phrase"].strip()):
        raise UserError(f"{where}: needs a non-empty 'phrase'")
    return o["phrase"]


def _box(o: dict, w: int, h: int, where: str) -> tuple[float, float, float, float]:
    box = o.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in box)):
        raise UserError(f"{where}: 'bbox' must be 4 pixel numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise UserError(f"{where}: bbox {box} is empty or outside the {w}x{h} image")
    return (x1, y1, x2, y2)
