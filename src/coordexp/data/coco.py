"""COCO instances <-> records: xywh -> xyxy, desc = category name, crowd skipped by default."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

from coordexp.data.records import MAX_SIDE, DetObject, Record
from coordexp.errors import UserError
from coordexp.files import parse_json, read_text

# LVIS image keys (category ids) and the record keys that keep them (category names)
LVIS_KEYS = {"neg_category_ids": "neg_categories",
             "not_exhaustive_category_ids": "not_exhaustive_categories"}


def load_json(path: str | Path) -> object:
    return parse_json(read_text(path), f"{path} (truncated?)")


def coco_to_records(instances: object, images_dir: Path, out_dir: Path, *, max_objects: int = 60,
                    keep_crowd: bool = False,
                    source: str = "instances") -> tuple[list[Record], Counter]:
    """Convert a COCO instances dict; returns records and counts of what was skipped and why
    (crowd and degenerate boxes, images over max_objects and their annotations)."""
    names, by_image = index_instances(instances, source)
    skipped: Counter = Counter()
    records = []
    for img in instances["images"]:
        objects = image_objects(img, by_image[img["id"]], names, skipped, keep_crowd)
        if len(objects) > max_objects:
            skipped["images_over_max_objects"] += 1
            skipped["annotations_in_images_over_max_objects"] += len(objects)
            continue
        if "file_name" not in img:
            raise UserError(f"{source}: image id {img['id']} has no 'file_name'")
        rel = os.path.relpath(images_dir / img["file_name"], out_dir)
        records.append(Record(rel, int(img["width"]), int(img["height"]), tuple(objects),
                              out_dir, {"image_id": img["id"]}))
    return records, skipped


def index_instances(instances: object, source: str) -> tuple[dict, dict[object, list]]:
    """Category names by id and annotations by image id, after checking every field they use:
    a missing or mistyped field, a duplicate id or an unknown reference is an error naming the
    entry."""
    if not isinstance(instances, dict):
        raise UserError(f"{source}: a COCO instances file must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances.get(key), list):
            raise UserError(f"{source}: top-level key '{key}' must be a list"
                            if key in instances else f"{source}: missing top-level key '{key}'")
    names = _categories(instances["categories"], source)
    image_ids = _image_ids(instances["images"], source)
    by_image = defaultdict(list)
    for i, ann in enumerate(instances["annotations"]):
        if not isinstance(ann, dict):
            raise UserError(f"{source}: annotation {i} must be an object")
        where = f"{source}: annotation {i} (id {ann.get('id')})"
        image_id = _field(ann, "image_id", _is_id, "an integer or string", where)
        category = _field(ann, "category_id", _is_id, "an integer or string", where)
        if category not in names:
            raise UserError(f"{where} has category_id {category!r}, which no category has")
        if image_id not in image_ids:
            raise UserError(f"{where} has image_id {image_id!r}, which no image has")
        if "bbox" not in ann:
            raise UserError(f"{where} has no 'bbox' (segmentation-only annotations are not "
                            "supported)")
        if not _is_bbox(ann["bbox"]):
            raise UserError(f"{where} has bbox {_short(ann['bbox'])}; expected [x, y, width, "
                            "height], 4 finite numbers")
        if "iscrowd" in ann:
            _field(ann, "iscrowd", lambda v: v in (0, 1), "0 or 1", where)
        by_image[image_id].append(ann)
    return names, by_image


def _field(entry: dict, key: str, ok, what: str, where: str):
    if key not in entry:
        raise UserError(f"{where} has no '{key}'")
    value = entry[key]
    if not ok(value):
        raise UserError(f"{where}: '{key}' must be {what}, got {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_id(v: object) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(v))


def _is_side(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE


def _is_name(v: object) -> bool:
    return isinstance(v, str) and bool(v.strip()) and not any(c in v for c in "\n\r\t")


def _is_bbox(v: object) -> bool:
    return isinstance(v, list) and len(v) == 4 and all(
        isinstance(x, int | float) and not isinstance(x, bool) and abs(x) <= MAX_SIDE
        for x in v)  # NaN and infinity fail the comparison


def _unique(entry: dict, where: str, seen: dict, kind: str):
    key = _field(entry, "id", _is_id, "an integer or string", where)
    if key in seen:
        raise UserError(f"{where}: duplicate {kind} id {key!r} (also {seen[key]})")
    seen[key] = where
    return key


def _categories(categories: list, source: str) -> dict:
    names, seen = {}, {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict):
            raise UserError(f"{source}: category {i} must be an object")
        where = f"{source}: category {i} (id {cat.get('id')})"
        key = _unique(cat, where, seen, "category")
        names[key] = _field(cat, "name", _is_name, "a non-empty one-line string", where)
    return names


def _image_ids(images: list, source: str) -> set:
    seen = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise UserError(f"{source}: image {i} must be an object")
        where = f"{source}: image {i} (id {img.get('id')})"
        _unique(img, where, seen, "image")
        if "file_name" in img:  # LVIS may give coco_url instead
            _field(img, "file_name", lambda v: isinstance(v, str) and v.strip() and "\0" not in v,
                   "a non-empty path", where)
        for side in ("width", "height"):
            _field(img, side, _is_side, f"an integer in [1, {MAX_SIDE}]", where)
    return set(seen)


def image_objects(img: dict, anns: list[dict], names: dict[int, str], skipped: Counter,
                  keep_crowd: bool) -> list[DetObject]:
    """One image's objects: boxes clipped to the image; crowd and empty boxes counted out."""
    objects = []
    for ann in anns:
        if ann.get("iscrowd", 0) and not keep_crowd:
            skipped["crowd_annotations"] += 1
            continue
        box = _clip_xywh(ann["bbox"], int(img["width"]), int(img["height"]))
        if box is None:
            skipped["degenerate_boxes"] += 1
            continue
        objects.append(DetObject(names[ann["category_id"]], box))
    return objects


def _clip_xywh(bbox: list[float], w: int, h: int) -> tuple[float, ...] | None:
    x, y, bw, bh = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def records_to_coco(records: list[Record]) -> dict:
    """Records -> COCO instances (category ids 1.. in first-seen order; image ids from the
    records' `image_id` when every record has a distinct one, else 1..N). LVIS records also
    give their images `neg_category_ids` and `not_exhaustive_category_ids`."""
    ids = [r.extra.get("image_id") for r in records]
    if not (all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)):
        ids = list(range(1, len(records) + 1))
    cats: dict[str, int] = {}
    images, anns = [], []
    for image_id, rec in zip(ids, records, strict=True):
        image = {"id": image_id, "file_name": rec.image, "width": rec.width,
                 "height": rec.height}
        for o in rec.objects:
            x1, y1, x2, y2 = o.box_px
            anns.append({"id": len(anns) + 1, "image_id": image_id,
                         "category_id": cats.setdefault(o.desc, len(cats) + 1), "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                        | ({"difficult": 1} if o.difficult else {}))
        for ids_key, names_key in LVIS_KEYS.items():
            if names_key in rec.extra:
                image[ids_key] = [cats.setdefault(n, len(cats) + 1) for n in rec.extra[names_key]]
        images.append(image)
    categories = [{"id": cid, "name": name} for name, cid in cats.items()]
    return {"images": images, "annotations": anns, "categories": categories}
