"""Peak memory of `coordexp eval` as predictions on one image grow (100 GT boxes on a grid,
jittered copies of them as predictions, every one evaluated: --max-preds-per-image is raised).

Each size runs in a fresh process; its own peak resident memory (VmHWM, imports included) is
printed with the ratio to the smallest size measured in the same run. Matching memory grows
with the candidates kept, so the ratio stays near 1 where a dense (P+G) x (G+P) cost matrix
would need 4.7 GiB at 25,000 predictions.

    python benchmarks/bench_eval_memory.py [--sizes 250 2500 25000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROBE = """
import sys
from pathlib import Path
from coordexp.cli import main
main(sys.argv[1:])
status = Path("/proc/self/status").read_text().splitlines()
print("peak_kb", next(x for x in status if x.startswith("VmHWM")).split()[1])
"""


def write_scene(folder: Path, n_pred: int) -> None:
    rng = np.random.default_rng(0)
    gt = [[100 * (i % 10) + 10, 100 * (i // 10) + 10, 100 * (i % 10) + 80,
           100 * (i // 10) + 80] for i in range(100)]
    boxes = np.asarray(gt, float)[rng.integers(0, 100, n_pred)] + rng.normal(0, 4, (n_pred, 4))
    head = {"images": ["img.png"], "width": 1000, "height": 1000}
    objs = [{"desc": "box", "score": float(s), "bbox_2d": b} for b, s in
            zip(np.clip(boxes, 0, 1000).round(1).tolist(), rng.uniform(0, 1, n_pred), strict=True)]
    (folder / "gt.jsonl").write_text(json.dumps(
        head | {"objects": [{"desc": "box", "bbox_2d": b} for b in gt]}) + "\n")
    (folder / "pred.jsonl").write_text(json.dumps(head | {"objects": objs}) + "\n")


def peak_mb(n_pred: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_scene(folder, n_pred)
        out = subprocess.run(
            [sys.executable, "-c", PROBE, "eval", "--gt", str(folder / "gt.jsonl"), "--pred",
             str(folder / "pred.jsonl"), "--out", str(folder / "o"), "--semantic", "off",
             "--max-preds-per-image", str(n_pred)], capture_output=True, text=True, check=True)
    return int(out.stdout.split("peak_kb")[1].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 2500, 25000])
    args = ap.parse_args()
    base = None
    for n in args.sizes:
        mb = peak_mb(n)
        base = base or mb
        print(f"{n:>6} predictions on one image: peak {mb:7.1f} MB  ({mb / base:.2f}x the "
              f"{args.sizes[0]}-prediction run)")


if __name__ == "__main__":
    main()
