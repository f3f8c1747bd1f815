"""Seeded synthetic detection scenes: coloured shapes, overlaps, and crowded same-class rows.

The crowded rows ("books on a shelf") reproduce the failure case the seed note studies:
many small, similar objects side by side.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from coordexp.data.coco import records_to_coco
from coordexp.data.records import DetObject, Record, write_records
from coordexp.errors import UserError

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
           "yellow": (235, 210, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")


@dataclass(frozen=True)
class SynthSpec:
    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 12
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    min_size_frac: float = 0.12  # object side as a fraction of the image side
    max_size_frac: float = 0.35
    crowded_share: float = 0.15  # fraction of images that hold a crowded shelf
    shelf_rows: int = 1  # a shelf is a grid of up to this many rows of one class
    shelf_ragged: float = 0.0  # shelf objects share a bottom line; tops drop up to this * height
    background: tuple[int, int, int] = (30, 30, 30)

    def check(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise UserError(f"need 1 <= min_objects <= max_objects, got "
                            f"{self.min_objects}..{self.max_objects}")
        if self.image_size < 32:
            raise UserError(f"image_size must be >= 32, got {self.image_size}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        unknown += [c for c in self.colours if c not in COLOURS]
        if unknown or not self.shapes or not self.colours:
            raise UserError(f"unknown shape/colour {unknown}; choose from {SHAPES} and "
                            f"{tuple(COLOURS)}")
        if not 0 < self.min_size_frac <= self.max_size_frac < 1:
            raise UserError("need 0 < min_size_frac <= max_size_frac < 1")
        if not 0 <= self.crowded_share <= 1:
            raise UserError(f"crowded_share must be in [0, 1], got {self.crowded_share}")
        if not 1 <= self.shelf_rows <= 4:
            raise UserError(f"shelf_rows must be in 1..4, got {self.shelf_rows}")
        if not 0 <= self.shelf_ragged < 1:
            raise UserError(f"shelf_ragged must be in [0, 1), got {self.shelf_ragged}")


# The crowded task (`coordexp data synth --preset crowded`): most images hold a shelf of 4-12
# same-colour squares in 1-3 rows beside a few larger squares, at the demo's scale, so a tiny
# model enumerates many near-identical objects and starts to repeat them.
CROWDED = SynthSpec(image_size=112, min_objects=6, max_objects=12,
                    colours=("red", "green", "blue", "yellow"), shapes=("square",),
                    min_size_frac=0.15, max_size_frac=0.35, crowded_share=0.8, shelf_rows=3)
# The dense task (`--preset dense`): every image a shelf of up to 4 rows, 12-30 objects of 6-20 %
# of the side; a tiny model early in Stage 1 repeats boxes on it (benchmarks/README.md).
DENSE = SynthSpec(image_size=112, min_objects=12, max_objects=30,
                  colours=("red", "green", "blue", "yellow"), shapes=("square",),
                  min_size_frac=0.06, max_size_frac=0.2, crowded_share=1.0, shelf_rows=4)
# The books task (`--preset books`): the crowded task with ragged shelves, objects standing on a
# common bottom line with tops up to 60 % lower, like books. The (y1, x1) answer order then jumps
# along a row instead of walking it, and a tiny model loses track of what it has listed: it
# repeats boxes through much of Stage 1 (benchmarks/README.md).
BOOKS = dataclasses.replace(CROWDED, shelf_ragged=0.6)
PRESETS = {"shapes": SynthSpec(), "crowded": CROWDED, "dense": DENSE, "books": BOOKS}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
               fill: tuple[int, int, int]) -> None:
    """Draw a shape whose extreme pixels are exactly the inclusive box corners."""
    x1, y1, x2, y2 = box
    cx = (x1 + x2) / 2
    cy = (y1 + y2) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)


def _random_object(rng: random.Random, spec: SynthSpec) -> tuple[str, tuple[int, int, int, int]]:
    s = spec.image_size
    side = round(s * rng.uniform(spec.min_size_frac, spec.max_size_frac))
    w = max(4, round(side * rng.uniform(0.8, 1.25)))
    h = max(4, side)
    x1, y1 = rng.randrange(0, s - w), rng.randrange(0, s - h)
    desc = f"{rng.choice(spec.colours)} {rng.choice(spec.shapes)}"
    return desc, (x1, y1, min(x1 + w, s - 1), min(y1 + h, s - 1))


def _crowded_shelf(rng: random.Random, spec: SynthSpec, n: int) -> list[tuple[str, tuple]]:
    """Up to n small same-class objects side by side: one horizontal band, or a grid of up to
    spec.shelf_rows bands (books on a shelf). A band holds at most (size - 8) // 6 objects
    (4 px wide, 2 px apart): more rows are drawn if allowed, and what still does not fit is
    left off (the caller draws it as free objects)."""
    s, gap = spec.image_size, 2
    fit = (s - 8) // (4 + gap)  # objects a band can hold
    rows = rng.randint(1, min(spec.shelf_rows, n // 2)) if spec.shelf_rows > 1 else 1
    rows = max(rows, min(spec.shelf_rows, -(-n // fit)))
    n = min(n, rows * fit)
    cols = -(-n // rows)
    w = max(4, min((s - 8) // cols - gap, round(s * spec.min_size_frac)))
    h = min(max(4, round(w * rng.uniform(1.2, 2.0))), (s - 4) // rows - gap)
    height = rows * h + (rows - 1) * gap
    x0, y0 = rng.randrange(2, max(3, s - cols * (w + gap))), rng.randrange(0, s - height)
    desc = f"{rng.choice(spec.colours)} {rng.choice(spec.shapes)}"
    cells = [divmod(i, cols) for i in range(n)]  # (row, column)
    drops = [round((h - 1) * rng.uniform(0, spec.shelf_ragged)) if spec.shelf_ragged else 0
             for _ in cells]  # ragged tops: the (y1, x1) order along a row is then shuffled
    return [(desc, (x0 + c * (w + gap), y0 + r * (h + gap) + d, x0 + c * (w + gap) + w - 1,
                    y0 + r * (h + gap) + h - 1)) for (r, c), d in zip(cells, drops, strict=True)]


def make_scene(seed: int, spec: SynthSpec) -> tuple[Image.Image, list[DetObject]]:
    """One image and its objects, a pure function of (seed, spec)."""
    rng = random.Random(seed)
    n = rng.randint(spec.min_objects, spec.max_objects)
    objects = []
    if n >= 4 and rng.random() < spec.crowded_share:
        objects += _crowded_shelf(rng, spec, rng.randint(4, n))
        n -= len(objects)
    objects += [_random_object(rng, spec) for _ in range(n)]
    image = Image.new("RGB", (spec.image_size, spec.image_size), spec.background)
    draw = ImageDraw.Draw(image)
    for desc, box in objects:
        colour, shape = desc.split(" ")
        draw_shape(draw, shape, box, COLOURS[colour])
    return image, [DetObject(d, tuple(float(v) for v in b)) for d, b in objects]


def write_split(out: Path, split: str, count: int, seed: int, spec: SynthSpec) -> list[Record]:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(count), desc=f"synth {split}", disable=count < 200):
        image, objects = make_scene(seed * 1_000_003 + hash_split(split) + i, spec)
        rel = f"images/{split}/{i:06d}.png"
        image.save(out / rel)
        records.append(Record(rel, spec.image_size, spec.image_size, tuple(objects), out))
    write_records(out / f"{split}.jsonl", records)
    return records


def hash_split(split: str) -> int:
    return {"train": 0, "val": 500_000}[split]


def synthesize(out: str | Path, n_train: int, n_val: int, seed: int = 0,
               spec: SynthSpec | None = None) -> dict[str, int]:
    """Write train.jsonl, val.jsonl, their PNGs and val_coco.json under `out`."""
    spec = spec or SynthSpec()
    spec.check()
    if n_train < 0 or n_val < 0:
        raise UserError(f"--train and --val must be >= 0, got {n_train} and {n_val}")
    out = Path(out)
    write_split(out, "train", n_train, seed, spec)
    val = write_split(out, "val", n_val, seed, spec)
    coco = records_to_coco(val)
    (out / "val_coco.json").write_text(json.dumps(coco), encoding="utf-8")
    return {"train": n_train, "val": n_val}
