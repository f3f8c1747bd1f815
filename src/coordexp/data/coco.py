"""COCO instances <-> records: xywh -> xyxy, desc = category name, crowd skipped by default."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from coordexp.data.records import DetObject, Record
from coordexp.errors import UserError

# LVIS image keys (category ids) and the record keys that keep them (category names)
LVIS_KEYS = {"neg_category_ids": "neg_categories",
             "not_exhaustive_category_ids": "not_exhaustive_categories"}


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (truncated?): {e.msg} at line {e.lineno} "
                        f"column {e.colno}") from None


def coco_to_records(instances: dict, images_dir: Path, out_dir: Path, *, max_objects: int = 60,
                    keep_crowd: bool = False,
                    source: str = "instances") -> tuple[list[Record], Counter]:
    """Convert a COCO instances dict; returns records and counts of what was skipped and why."""
    names, by_image = index_instances(instances, source)
    skipped: Counter = Counter()
    records = []
    for img in instances["images"]:
        objects = image_objects(img, by_image[img["id"]], names, skipped, keep_crowd)
        if len(objects) > max_objects:
            skipped["images_over_max_objects"] += 1
            continue
        if "file_name" not in img:
            raise UserError(f"{source}: image id {img['id']} has no 'file_name'")
        rel = os.path.relpath(images_dir / img["file_name"], out_dir)
        records.append(Record(rel, int(img["width"]), int(img["height"]), tuple(objects),
                              out_dir, {"image_id": img["id"]}))
    return records, skipped


def index_instances(instances: dict, source: str) -> tuple[dict[int, str], dict[int, list]]:
    """Category names by id and annotations by image id, after checking the keys they use."""
    for key in ("images", "annotations", "categories"):
        if key not in instances:
            raise UserError(f"{source}: missing top-level key '{key}'")
    for kind, items, keys in (("category", instances["categories"], ("id", "name")),
                              ("image", instances["images"], ("id", "width", "height")),
                              ("annotation", instances["annotations"],
                               ("image_id", "category_id", "bbox"))):
        for i, item in enumerate(items):
            missing = [k for k in keys if k not in item]
            if missing:
                raise UserError(f"{source}: {kind} {i} (id {item.get('id')}) has no "
                                f"'{missing[0]}'")
    names = {c["id"]: c["name"] for c in instances["categories"]}
    image_ids = {img["id"] for img in instances["images"]}
    by_image = defaultdict(list)
    for i, ann in enumerate(instances["annotations"]):
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in box)):
            raise UserError(f"{source}: annotation {i} (id {ann.get('id')}) has bbox {box!r}; "
                            "expected [x, y, width, height]")
        if ann["category_id"] not in names:
            raise UserError(f"{source}: annotation {i} (id {ann.get('id')}) has category_id "
                            f"{ann['category_id']}, which no category has")
        if ann["image_id"] not in image_ids:
            raise UserError(f"{source}: annotation {i} (id {ann.get('id')}) has image_id "
                            f"{ann['image_id']}, which no image has")
        by_image[ann["image_id"]].append(ann)
    return names, by_image


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
