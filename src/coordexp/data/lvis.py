"""LVIS instances -> records: COCO boxes plus each image's federated labels.

An LVIS image lists the categories verified absent (`neg_category_ids`) and those whose
instances are not all annotated (`not_exhaustive_category_ids`); records keep them by name as
`neg_categories` and `not_exhaustive_categories`, which `coordexp eval` reads (eval/lvis.py).
Image files come from `file_name`, else the last two parts of `coco_url` (`val2017/x.jpg`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from coordexp.data.coco import LVIS_KEYS, image_objects, index_instances
from coordexp.data.records import Record
from coordexp.errors import UserError


def lvis_to_records(instances: dict, images_dir: Path, out_dir: Path, *, max_objects: int = 60,
                    source: str = "instances") -> tuple[list[Record], Counter]:
    """Convert an LVIS instances dict; returns records and counts of what was skipped and why."""
    names, by_image = index_instances(instances, source)
    skipped: Counter = Counter()
    records = []
    for img in instances["images"]:
        where = f"{source}: image id {img['id']}"
        objects = image_objects(img, by_image[img["id"]], names, skipped, keep_crowd=False)
        if len(objects) > max_objects:
            skipped["images_over_max_objects"] += 1
            continue
        extra = {"image_id": img["id"]}
        for ids_key, names_key in LVIS_KEYS.items():
            extra[names_key] = _category_names(img.get(ids_key), names, f"{where}: {ids_key}")
        rel = os.path.relpath(images_dir / _file_name(img, where), out_dir)
        records.append(Record(rel, int(img["width"]), int(img["height"]), tuple(objects),
                              out_dir, extra))
    return records, skipped


def _file_name(img: dict, where: str) -> str:
    if "file_name" in img:
        return img["file_name"]
    if "coco_url" not in img:
        raise UserError(f"{where}: has neither 'file_name' nor 'coco_url'")
    return "/".join(img["coco_url"].split("/")[-2:])


def _category_names(ids: object, names: dict[int, str], where: str) -> list[str]:
    if ids is None:
        raise UserError(f"{where} is missing (is this an LVIS file? use `coordexp data coco`)")
    if not (isinstance(ids, list) and all(isinstance(i, int) and i in names for i in ids)):
        raise UserError(f"{where} must list ids of categories in the file, got {ids!r}")
    return [names[i] for i in ids]
