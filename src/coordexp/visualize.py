"""`coordexp visualize`: every image with its predicted boxes drawn (solid, a colour per label,
"label score" on top) and, when ground truth is given, its GT boxes (dashed green), plus an
`index.html` gallery; with GT the gallery starts at the worst per-image F1 (the same matching
as `coordexp eval`).
"""

from __future__ import annotations

import html
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont

from coordexp.data.images import open_rgb8
from coordexp.data.records import Record, read_records
from coordexp.errors import UserError
from coordexp.eval.evaluate import EvalOptions, evaluate_predictions
from coordexp.eval.f1 import precision_recall_f1
from coordexp.eval.predictions import (
    Prediction,
    align_lines,
    read_prediction,
    read_prediction_lines,
)

PALETTE = ("#e6194b", "#4363d8", "#f58231", "#911eb4", "#f032e6", "#ffe119", "#46f0f0",
           "#9a6324", "#800000", "#000075")  # no green: green is the GT's
GT_COLOUR = "#00e000"
MIN_SIDE = 512  # smaller images are enlarged (nearest) so labels stay readable


@dataclass(frozen=True)
class Card:
    """One gallery entry."""

    file: str  # drawn image, relative to the output folder
    image: str
    pred_objects: int
    gt_objects: int | None  # None without GT
    matched: int | None
    f1: float | None


def visualize_command(pred_path: str | Path, out_dir: str | Path, *, gt: str | Path | None = None,
                      image_root: str | Path | None = None, min_score: float = 0.0) -> int:
    records, preds, rows = load_pairs(pred_path, gt)
    root = Path(image_root) if image_root is not None else Path(gt or pred_path).parent
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cards = []
    for k, (rec, pred) in enumerate(zip(records, preds, strict=True)):
        path = root / rec.image
        drawn = draw_boxes(open_image(path, rec), pred, rec.objects if gt else (), min_score)
        name = f"images/{k:05d}_{Path(rec.image).stem}.png"
        drawn.save(out / name)
        cards.append(card(name, rec, pred, None if rows is None else rows[k]))
    if rows is not None:
        cards.sort(key=lambda c: c.f1)  # stable: ties keep input order
    (out / "index.html").write_text(gallery_html(cards, min_score), encoding="utf-8")
    print(f"drew {len(cards)} images; gallery: {out / 'index.html'}")
    return 0


def load_pairs(pred_path: str | Path, gt: str | Path | None
               ) -> tuple[list[Record], list[Prediction | None], list[dict] | None]:
    """Records, their predictions (None: no line for a GT image) and, with GT, eval's
    per-image rows."""
    lines = read_prediction_lines(pred_path)
    if not lines:
        raise UserError(f"{pred_path}: no predictions")
    if gt is None:
        records = [record_of(obj, where) for obj, where in lines]
        preds = [read_prediction(obj, where, rec, constant_score=None, desc_weight=0.0,
                                 field_order="desc_first")
                 for (obj, where), rec in zip(lines, records, strict=True)]
        return records, preds, None
    records = read_records(gt)
    aligned = align_lines(records, lines, str(pred_path))
    preds = [read_prediction(obj, where, rec, constant_score=None, desc_weight=0.0,
                             field_order="desc_first") if obj is not None else None
             for rec, (obj, where) in zip(records, aligned, strict=True)]
    rows = evaluate_predictions(records, preds, EvalOptions(semantic=False)).per_image
    return records, preds, rows


def record_of(obj: object, where: str) -> Record:
    """The image, width and height a pred line names (needed when no GT is given)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a prediction record must be a JSON object")
    images, w, h = obj.get("images"), obj.get("width"), obj.get("height")
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)):
        raise UserError(f"{where}: 'images' must be a list with exactly one path")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise UserError(f"{where}: needs positive integer 'width' and 'height' (or pass --gt)")
    return Record(images[0], w, h, ())


def open_image(path: Path, rec: Record) -> Image.Image:
    if not path.is_file():
        raise UserError(f"{path}: image not found (paths are relative to --image-root, "
                        "by default the --gt file's folder, else the --pred file's)")
    image = open_rgb8(path)
    if image.size != (rec.width, rec.height):
        raise UserError(f"{path}: image is {image.size[0]}x{image.size[1]} but the predictions "
                        f"are for {rec.width}x{rec.height}")
    return image


def draw_boxes(image: Image.Image, pred: Prediction | None, gt_objects, min_score: float
               ) -> Image.Image:
    """GT dashed, then predictions solid with "label score"; small images enlarged first."""
    scale = max(1, -(-MIN_SIDE // max(image.size)))  # whole factor: pixels stay sharp
    canvas = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(11, round(max(canvas.size) / 45)))
    for o in gt_objects:
        dashed_rectangle(draw, [v * scale for v in o.box_px], GT_COLOUR, width)
    if pred is not None:
        for desc, box, score in zip(pred.descs, pred.boxes_px.tolist(), pred.scores.tolist(),
                                    strict=True):
            if score >= min_score:
                labelled_box(draw, [v * scale for v in box], f"{desc} {score:.2f}",
                             label_colour(desc), width, font)
    return canvas


def label_colour(desc: str) -> str:
    return PALETTE[zlib.crc32(desc.encode("utf-8")) % len(PALETTE)]


def labelled_box(draw: ImageDraw.ImageDraw, box: list[float], text: str, colour: str,
                 width: int, font) -> None:
    x1, y1, x2, y2 = box
    draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=width)
    left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
    shift = bottom - top + 4 if y1 - (bottom - top) - 4 >= 0 else 0  # above the box if room
    draw.rectangle([left - 2, top - shift - 2, right + 2, bottom - shift + 2], fill=colour)
    r, g, b = ImageColor.getrgb(colour)
    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"  # readable on fill
    draw.text((x1, y1 - shift), text, fill=ink, font=font)


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: list[float], colour: str,
                     width: int) -> None:
    x1, y1, x2, y2 = box
    dash = 4 * width
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True),
                                    (y1, y2, x1, False), (y1, y2, x2, False)):
        start = a
        while start < b:
            end = min(start + dash, b)
            line = [start, fixed, end, fixed] if horizontal else [fixed, start, fixed, end]
            draw.line(line, fill=colour, width=width)
            start += 2 * dash


def card(file: str, rec: Record, pred: Prediction | None, row: dict | None) -> Card:
    n_pred = 0 if pred is None else len(pred.descs)
    if row is None:
        return Card(file, rec.image, n_pred, None, None, None)
    f1 = precision_recall_f1(row["matched"], row["pred_objects"], row["gt_objects"])[2]
    return Card(file, rec.image, n_pred, row["gt_objects"], row["matched"], f1)


def gallery_html(cards: list[Card], min_score: float) -> str:
    with_gt = bool(cards) and cards[0].f1 is not None
    order = "worst F1 first" if with_gt else "input order"
    legend = ("solid: predictions (label score)" + (f", score >= {min_score}" if min_score else "")
              + ("; dashed green: ground truth" if with_gt else ""))
    figures = "\n".join(figure(c) for c in cards)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>coordexp predictions</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1em; }}
figure {{ margin: 0; }} img {{ width: 100%; height: auto; border: 1px solid #ccc; }}
figcaption {{ font-size: 0.85em; word-break: break-all; }}
</style></head>
<body><h1>{len(cards)} images, {order}</h1><p>{html.escape(legend)}</p>
<div class="grid">
{figures}
</div></body></html>
"""


def figure(c: Card) -> str:
    counts = f"{c.pred_objects} predicted"
    if c.f1 is not None:
        counts += f", {c.gt_objects} GT, {c.matched} matched, F1 {c.f1:.3f}"
    return (f'<figure><a href="{html.escape(c.file)}"><img src="{html.escape(c.file)}" '
            f'alt="{html.escape(c.image)}"></a><figcaption>{html.escape(c.image)}<br>{counts}'
            "</figcaption></figure>")
