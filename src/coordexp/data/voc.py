"""Pascal VOC (Annotations/*.xml + JPEGImages/) -> records.

VOC boxes are 1-based inclusive pixel indices; as detectron2 does, they become pixel-edge boxes
x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax. `difficult` objects are kept and flagged
(`"difficult": true`) or dropped and counted. XML with a DTD or entities is refused.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from xml.parsers import expat

from coordexp.data.records import DetObject, Record, image_size
from coordexp.errors import UserError

DIFFICULT = ("keep", "drop")


def voc_to_records(root: Path, out_dir: Path, *, difficult: str = "keep",
                   image_set: str = "") -> tuple[list[Record], Counter]:
    """Convert every annotation (or those listed in ImageSets/Main/<image_set>.txt)."""
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise UserError(f"{ann_dir}: no such folder (expected Annotations/ and JPEGImages/)")
    if image_set:
        paths = _read_image_set(root / "ImageSets" / "Main" / f"{image_set}.txt", ann_dir)
    else:
        paths = sorted(ann_dir.glob("*.xml"))
    skipped: Counter = Counter()
    records = [_convert(p, root / "JPEGImages", out_dir, difficult, skipped) for p in paths]
    if not image_set:  # images no annotation names (a test split, say) are counted, not lost
        named = {r.image_path.resolve() for r in records}
        skipped["images_without_annotation"] = sum(
            p.resolve() not in named for p in (root / "JPEGImages").iterdir() if p.is_file())
    return records, +skipped  # unary + drops zero counts


def _read_image_set(path: Path, ann_dir: Path) -> list[Path]:
    """The annotation files of the ids an image set lists, one a line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (the image set lists one image id a line)")
    paths = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            paths.append(ann_dir / f"{line.split()[0]}.xml")
            if not paths[-1].is_file():
                raise UserError(f"{path}:{lineno}: no annotation {paths[-1]}")
    return paths


def _convert(path: Path, images_dir: Path, out_dir: Path, difficult: str,
             skipped: Counter) -> Record:
    tree, lines = parse_xml(path)
    image = images_dir / _text(tree, "filename", path, lines)
    if not image.is_file():
        raise UserError(f"{path}:{lines[tree.find('filename')]}: image {image} not found")
    w, h = image_size(image)
    size = tree.find("size")
    if size is not None and size.find("width") is not None:
        declared = (_number(size, "width", path, lines), _number(size, "height", path, lines))
        if declared != (w, h):
            raise UserError(f"{path}:{lines[size]}: size {declared[0]:g}x{declared[1]:g} differs "
                            f"from the image's {w}x{h}")
    objects = []
    for obj in tree.iter("object"):
        is_difficult = obj.find("difficult") is not None and _number(
            obj, "difficult", path, lines) == 1
        if is_difficult and difficult == "drop":
            skipped["difficult_objects"] += 1
            continue
        objects.append(_object(obj, path, lines, w, h, is_difficult))
    return Record(os.path.relpath(image, out_dir), w, h, tuple(objects), out_dir)


def _object(obj: ET.Element, path: Path, lines: dict, w: int, h: int,
            is_difficult: bool) -> DetObject:
    name = _text(obj, "name", path, lines)
    box = obj.find("bndbox")
    if box is None:
        raise UserError(f"{path}:{lines[obj]}: object {name!r} has no <bndbox>")
    xmin, ymin, xmax, ymax = (_number(box, k, path, lines) for k in
                              ("xmin", "ymin", "xmax", "ymax"))
    x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise UserError(f"{path}:{lines[box]}: box {xmin:g},{ymin:g},{xmax:g},{ymax:g} (1-based, "
                        f"inclusive) is empty or outside the {w}x{h} image")
    return DetObject(name, (x1, y1, x2, y2), is_difficult)


def _text(parent: ET.Element, tag: str, path: Path, lines: dict) -> str:
    el = parent.find(tag)
    if el is None or not (el.text or "").strip():
        raise UserError(f"{path}:{lines[parent]}: <{parent.tag}> has no <{tag}>")
    return el.text.strip()


def _number(parent: ET.Element, tag: str, path: Path, lines: dict) -> float:
    text = _text(parent, tag, path, lines)
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{path}:{lines[parent.find(tag)]}: <{tag}> {text!r} is not a "
                        "number") from None


def parse_xml(path: Path) -> tuple[ET.Element, dict[ET.Element, int]]:
    """The element tree and each element's line (ElementTree keeps no line numbers)."""
    builder, lines = ET.TreeBuilder(), {}
    parser = expat.ParserCreate()

    def start(tag: str, attrs: dict) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    def refuse(*_args) -> None:
        raise UserError(f"{path}:{parser.CurrentLineNumber}: DTDs and entities are not accepted")

    parser.StartElementHandler, parser.EndElementHandler = start, builder.end
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = parser.EntityDeclHandler = refuse
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as e:
        raise UserError(f"{path}:{e.lineno}: not valid XML (truncated?): "
                        f"{expat.ErrorString(e.code)}") from None
    return builder.close(), lines
