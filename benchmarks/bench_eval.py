"""Evaluator speed against plain pycocotools, and strict-parser throughput.

A COCO-like set (5,000 images, 80 categories with a long-tailed frequency, ~7 objects and ~3
categories per image, COCO's small/medium/large mix, VLM-like predictions with scores) is
scored by `evaluate_records` (COCO AP through faster-coco-eval + three Hungarian F1 passes) and
by pycocotools on the same boxes (including the conversion to COCO dicts it needs). Both run in
this process, best of --repeats each. Then the parser reads long rollouts (~60 objects, some
invalid, some truncated) as text and as token pieces.

    python benchmarks/bench_eval.py [--images 5000 --repeats 2 --rollouts 400]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import time

import numpy as np

from coordexp.codec import CoordCodec
from coordexp.data.records import DetObject, Record
from coordexp.data.render import render_object
from coordexp.eval import evaluate_records
from coordexp.eval.coco_map import Detections, coco_box_ap
from coordexp.parsing import parse_coordjson, parse_coordjson_tokens

CATEGORIES = [f"category {k}" for k in range(80)]


def make_dataset(num_images: int, seed: int) -> tuple[list[Record], list[dict]]:
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, len(CATEGORIES) + 1) ** 0.8  # long tail, like COCO's person/others
    freq /= freq.sum()
    gts, preds = [], []
    for i in range(num_images):
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 641))
        cats = rng.choice(len(CATEGORIES), size=min(1 + rng.poisson(1.9), 8), p=freq)
        n = min(int(rng.geometric(1 / 7.3)), 60) if rng.random() > 0.01 else 0
        objects = [DetObject(CATEGORIES[int(rng.choice(cats))], random_box(rng, w, h))
                   for _ in range(n)]
        gts.append(Record(f"img_{i:05d}.jpg", w, h, tuple(objects)))
        preds.append({"images": [f"img_{i:05d}.jpg"], "width": w, "height": h,
                      "objects": predict(rng, objects, w, h)})
    return gts, preds


def random_box(rng: np.random.Generator, w: int, h: int) -> tuple[float, ...]:
    area = float(np.exp(rng.uniform(np.log(40), np.log(0.6 * w * h))))  # ~40% small, as COCO
    aspect = float(np.exp(rng.normal(0, 0.5)))
    bw, bh = min(np.sqrt(area * aspect), w - 2), min(np.sqrt(area / aspect), h - 2)
    x1, y1 = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
    return (x1, y1, x1 + float(bw), y1 + float(bh))  # plain floats, as read from JSON


def predict(rng: np.random.Generator, objects: list[DetObject], w: int, h: int) -> list[dict]:
    """Most GT found with jitter and a confident score, a few duplicates and false positives."""
    out = []
    for o in objects:
        if rng.random() > 0.75:
            continue
        for _ in range(1 + (rng.random() < 0.05)):
            x1, y1, x2, y2 = o.box_px
            j = rng.normal(0, 0.08, 4) * [x2 - x1, y2 - y1, x2 - x1, y2 - y1]
            box = np.clip([x1 + j[0], y1 + j[1], x2 + j[2], y2 + j[3]], 0, [w, h, w, h])
            box[2:] = np.maximum(box[2:], box[:2] + 1)
            desc = o.desc if rng.random() < 0.9 else CATEGORIES[int(rng.integers(80))]
            out.append({"desc": desc, "bbox_2d": box.tolist(), "score": float(rng.beta(5, 2))})
    for _ in range(rng.poisson(1.5)):
        out.append({"desc": CATEGORIES[int(rng.integers(80))],
                    "bbox_2d": list(random_box(rng, w, h)), "score": float(rng.beta(2, 5))})
    return out


def run_pycocotools(gts: list[Record], preds: list[dict]) -> np.ndarray:
    """The same evaluation with plain pycocotools, from the same records."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat_id = {c: k + 1 for k, c in enumerate(dict.fromkeys(o.desc for r in gts for o in r.objects))}
    images = [{"id": i + 1, "width": r.width, "height": r.height} for i, r in enumerate(gts)]
    anns = []
    for i, r in enumerate(gts):
        for o in r.objects:
            x1, y1, x2, y2 = o.box_px
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_id[o.desc],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
    results = [{"image_id": i + 1, "category_id": cat_id[o["desc"]], "score": o["score"],
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
               for i, p in enumerate(preds) for o in p["objects"] if o["desc"] in cat_id
               for b in [o["bbox_2d"]]]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": v, "name": k} for k, v in cat_id.items()]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:9])


def ap_step(gts: list[Record], preds: list[dict]):
    """Our COCO AP step alone (faster-coco-eval), on detections prepared beforehand."""
    cats = list(dict.fromkeys(o.desc for r in gts for o in r.objects))
    index = {c: k for k, c in enumerate(cats)}
    gt = [Detections(np.asarray([o.box_px for o in r.objects]).reshape(-1, 4),
                     np.asarray([index[o.desc] for o in r.objects], dtype=np.int64)) for r in gts]
    pred = [Detections(np.asarray([o["bbox_2d"] for o in p["objects"]]).reshape(-1, 4),
                       np.asarray([index.get(o["desc"], -1) for o in p["objects"]], np.int64),
                       np.asarray([o["score"] for o in p["objects"]])) for p in preds]
    sizes = [(r.width, r.height) for r in gts]
    return lambda: coco_box_ap(gt, pred, sizes, cats)


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def make_rollouts(n: int, seed: int) -> list[str]:
    """Long greedy-rollout-like answers: ~60 objects, 2% invalid, 10% truncated."""
    rng = np.random.default_rng(seed)
    codec, texts = CoordCodec(), []
    for _ in range(n):
        objs = []
        for _ in range(int(rng.integers(40, 80))):
            bins = np.sort(rng.integers(0, codec.num_bins, 4)).tolist()
            o = render_object(CATEGORIES[int(rng.integers(80))], bins, codec, "desc_first")
            objs.append(o.replace("<|coord_", "", 1) if rng.random() < 0.02 else o)
        text = '{"objects": [' + ", ".join(objs) + "]}"
        texts.append(text[: int(len(text) * 0.9)] if rng.random() < 0.1 else text)
    return texts


def bench_parser(num_rollouts: int) -> None:
    texts = make_rollouts(num_rollouts, seed=1)
    pieces = [re.findall(r"<\|coord_\d+\|>|[^<]{1,3}|<", t) for t in texts]  # ~3 chars a token
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    t_text, results = best_time(lambda: [parse_coordjson(t) for t in texts], 2)
    t_tok, _ = best_time(lambda: [parse_coordjson_tokens(p) for p in pieces], 2)
    kept = sum(len(r.objects) for r in results)
    dropped = sum(r.dropped_invalid for r in results)
    print(f"parser: {num_rollouts} rollouts, {megabytes:.1f} MB, {kept} kept, {dropped} dropped")
    print(f"  parse_coordjson        {megabytes / t_text:7.1f} MB/s")
    print(f"  parse_coordjson_tokens {megabytes / t_tok:7.1f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=400)
    args = ap.parse_args()
    gts, preds = make_dataset(args.images, seed=0)
    n_gt = sum(len(r.objects) for r in gts)
    n_pred = sum(len(p["objects"]) for p in preds)
    print(f"eval: {len(gts)} images, {n_gt} GT, {n_pred} predictions, {len(CATEGORIES)} classes")
    ours_s, metrics = best_time(lambda: evaluate_records(gts, preds, semantic=False),
                                args.repeats)
    ap_s, _ = best_time(ap_step(gts, preds), args.repeats)
    ref_s, stats = best_time(lambda: run_pycocotools(gts, preds), args.repeats)
    ours = np.asarray([metrics[k] for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
                                            "AR10", "AR100")])
    print(f"  coordexp evaluate_records  {ours_s:6.2f} s  (COCO AP + F1 at 3 gates)")
    print(f"  pycocotools                {ref_s:6.2f} s  (COCO AP only)")
    print(f"  ratio ours / pycocotools   {ours_s / ref_s:6.3f}  (target <= 0.25)")
    print(f"  AP step alone              {ap_s:6.2f} s  (ratio {ap_s / ref_s:.3f})")
    print(f"  max |stat difference|      {np.abs(ours - stats).max():.2e}  "
          f"(mAP {metrics['mAP']:.4f}, f1 {metrics['f1']:.4f})")
    bench_parser(args.rollouts)


if __name__ == "__main__":
    main()
