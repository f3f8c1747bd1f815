"""Ultralytics YOLO detection datasets -> records.

Layout: DIR/data.yaml (`names`: a list, or a dict id -> name), DIR/images/<split>/*.jpg|png..,
DIR/labels/<split>/<image stem>.txt with one `class cx cy w h` line per object (normalised to
[0, 1]); an empty label file is an image without objects, a missing one is an error.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import yaml

from coordexp.data.records import DetObject, Record, image_size
from coordexp.errors import UserError

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
EDGE_TOLERANCE = 1e-5  # normalised overshoot from rounding cx +- w/2; clipped to the edge


def yolo_to_records(root: Path, split: str, out_dir: Path) -> tuple[list[Record], Counter]:
    """Convert one split; returns records and counts of what was skipped and why."""
    names = read_names(root / "data.yaml")
    images_dir, labels_dir = root / "images" / split, root / "labels" / split
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise UserError(f"{d}: no such folder (expected the Ultralytics layout "
                            f"images/{split}/ and labels/{split}/ under {root})")
    skipped: Counter = Counter()
    records, stems = [], set()
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped["non_image_files"] += 1
            continue
        stems.add(path.stem)
        w, h = image_size(path)
        objects = read_label_file(labels_dir / f"{path.stem}.txt", names, w, h)
        records.append(Record(os.path.relpath(path, out_dir), w, h, objects, out_dir))
    skipped["label_files_without_image"] = sum(p.stem not in stems
                                               for p in labels_dir.glob("*.txt"))
    return records, +skipped  # unary + drops zero counts


def read_names(path: Path) -> list[str]:
    """Class names from data.yaml, index = class id."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (a YOLO dataset names its classes there)")
    try:
        names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip()
                                                      for n in names)):
        raise UserError(f"{path}: 'names' must be a list of class names (or a dict 0.. -> name)")
    return names


def read_label_file(path: Path, names: list[str], w: int, h: int) -> tuple[DetObject, ...]:
    if not path.is_file():
        raise UserError(f"{path}: missing label file (an image without objects has an empty "
                        "one)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    objects = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            objects.append(_parse_line(line.split(), names, w, h, f"{path}:{lineno}"))
    return tuple(objects)


def _parse_line(fields: list[str], names: list[str], w: int, h: int, where: str) -> DetObject:
    if len(fields) != 5:
        raise UserError(f"{where}: expected 5 values 'class cx cy w h', got {len(fields)} "
                        "(segment polygons are not supported)")
    try:
        cls, values = int(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        raise UserError(f"{where}: expected an integer class and 4 numbers, got "
                        f"{' '.join(fields)!r}") from None
    if not 0 <= cls < len(names):
        raise UserError(f"{where}: class id {cls} is out of range (data.yaml names "
                        f"{len(names)} classes)")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"{where}: coordinates {' '.join(fields[1:])} must lie in [0, 1] "
                        "(normalised cx cy w h)")
    cx, cy, bw, bh = values
    corners = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    if bw <= 0 or bh <= 0 or not all(-EDGE_TOLERANCE <= v <= 1 + EDGE_TOLERANCE
                                     for v in corners):
        raise UserError(f"{where}: box cx cy w h = {' '.join(fields[1:])} is empty or extends "
                        "past the image edge")
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in corners)
    return DetObject(names[cls], (x1 * w, y1 * h, x2 * w, y2 * h))
