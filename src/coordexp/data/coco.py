"""COCO instances <-> records: xywh -> xyxy, desc = category name, crowd skipped by default."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from coordexp.data.records import DetObject, Record
from coordexp.errors import UserError


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
    for key in ("images", "annotations", "categories"):
        if key not in instances:
            raise UserError(f"{source}: missing top-level key '{key}'")
    names = {c["id"]: c["name"] for c in instances["categories"]}
    by_image = defaultdict(list)
    for ann in instances["annotations"]:
        by_image[ann["image_id"]].append(ann)
    skipped: Counter = Counter()
    records = []
    for img in instances["images"]:
        w, h = int(img["width"]), int(img["height"])
        objects = []
        for ann in by_image[img["id"]]:
            if ann.get("iscrowd", 0) and not keep_crowd:
                skipped["crowd_annotations"] += 1
                continue
            box = _clip_xywh(ann["bbox"], w, h)
            if box is None:
                skipped["degenerate_boxes"] += 1
                continue
            objects.append(DetObject(names[ann["category_id"]], box))
        if len(objects) > max_objects:
            skipped["images_over_max_objects"] += 1
            continue
        rel = os.path.relpath(images_dir / img["file_name"], out_dir)
        records.append(Record(rel, w, h, tuple(objects), out_dir, {"image_id": img["id"]}))
    return records, skipped


def _clip_xywh(bbox: list[float], w: int, h: int) -> tuple[float, ...] | None:
    x, y, bw, bh = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def records_to_coco(records: list[Record]) -> dict:
    """Records -> COCO instances (image ids 1.., category ids 1.. in first-seen order)."""
    cats: dict[str, int] = {}
    images, anns = [], []
    for i, rec in enumerate(records, 1):
        images.append({"id": i, "file_name": rec.image, "width": rec.width, "height": rec.height})
        for o in rec.objects:
            cid = cats.setdefault(o.desc, len(cats) + 1)
            x1, y1, x2, y2 = o.box_px
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cid, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    categories = [{"id": cid, "name": name} for name, cid in cats.items()]
    return {"images": images, "annotations": anns, "categories": categories}
