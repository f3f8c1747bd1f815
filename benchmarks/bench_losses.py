"""Peak memory and time of the CoordExp objective: lean LM-head path vs naive full float32 logits.

One teacher-forced sequence (T tokens, a Qwen-sized vocabulary, N coord slots), the seed run's
loss weights, forward + backward to the hidden states and the LM-head weight. Each path runs in
its own subprocess so their peaks do not mix; peak memory = peak RSS (getrusage) minus the RSS
after the inputs were built. Prints both measurements and the ratios lean / naive.

    python benchmarks/bench_losses.py [--vocab 152064 --tokens 2048 --slots 240 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from coordexp.codec import CoordCodec
from coordexp.decode import expected_coord
from coordexp.lmhead import coord_slice_logits, label_logits, vocab_logsumexp
from coordexp.losses import (
    bbox_ciou,
    bbox_smoothl1,
    coord_gate,
    coord_gate_from_lse,
    coord_soft_ce,
    coord_w1,
    text_gate,
    text_gate_from_lse,
    weighted_mean,
)

PROMPT_TOKENS = 200  # unsupervised prefix (system + user turn)
SIGMA, TRUNCATE = 2.0, 8  # the seed run's coord target
WEIGHTS = {"soft_ce": 0.1, "w1": 0.1, "gate": 1.0, "text_gate": 0.1, "smoothl1": 2.0, "ciou": 0.2}


def build_inputs(vocab: int, tokens: int, slots: int, hidden: int) -> dict:
    """Hidden rows (already shifted), LM-head weight, coord ids, slot/text rows and targets."""
    torch.manual_seed(0)
    num_bins = CoordCodec().num_bins
    answer = torch.arange(PROMPT_TOKENS, tokens)
    pick = torch.randperm(len(answer))
    return {
        "h": torch.randn(tokens, hidden).mul_(0.5).requires_grad_(),  # [T, D]
        "weight": torch.randn(vocab, hidden).mul_(0.05).requires_grad_(),  # [V, D]
        "coord_ids": torch.arange(vocab - num_bins, vocab),  # [K], the added tokens at the end
        "coord_rows": answer[pick[:slots]].sort().values,  # [N], 4 per box
        "coord_bins": torch.randint(0, num_bins, (slots,)),  # [N]
        "text_rows": answer[pick[slots:]].sort().values,  # [M]
        "text_labels": torch.randint(0, vocab - num_bins, (len(answer) - slots,)),  # [M]
    }


def box_terms(coord_logits: Tensor, coord_bins: Tensor) -> dict[str, Tensor]:
    pred = expected_coord(coord_logits).reshape(-1, 4)  # [N/4, 4]
    gt = (coord_bins.float() / (coord_logits.shape[-1] - 1)).reshape(-1, 4)
    return {
        "soft_ce": coord_soft_ce(coord_logits, coord_bins, sigma=SIGMA, truncate=TRUNCATE),
        "w1": coord_w1(coord_logits, coord_bins, sigma=SIGMA, truncate=TRUNCATE),
        "smoothl1": bbox_smoothl1(pred, gt),
        "ciou": bbox_ciou(pred, gt),
    }


def naive_objective(x: dict) -> Tensor:
    """Full [T, V] float32 logits, then the same loss functions on slices of them."""
    logits = x["h"] @ x["weight"].T  # [T, V]
    labels = torch.full((len(logits),), -100)
    labels[x["text_rows"]] = x["text_labels"]
    coord_rows, coord_ids = x["coord_rows"], x["coord_ids"]
    terms = box_terms(logits[coord_rows][:, coord_ids], x["coord_bins"])
    terms["gate"] = coord_gate(logits[coord_rows], coord_ids)
    terms["text_gate"] = text_gate(logits[x["text_rows"]], coord_ids)
    token_ce = F.cross_entropy(logits, labels, ignore_index=-100)
    return token_ce + sum(WEIGHTS[k] * v for k, v in terms.items())


def lean_objective(x: dict) -> Tensor:
    """Coord-slice logits, chunked full-vocab logsumexp and label logits; no [T, V] tensor.
    Temperature is 1 (the seed's), so token CE and both gates share one logsumexp."""
    weight, coord_ids, num_slots = x["weight"], x["coord_ids"], len(x["coord_rows"])
    h = x["h"][torch.cat([x["coord_rows"], x["text_rows"]])]  # [N + M, D]
    lse = vocab_logsumexp(h, weight)  # [N + M]
    coord_logits = coord_slice_logits(h, weight, coord_ids)  # [N + M, K]
    terms = box_terms(coord_logits[:num_slots], x["coord_bins"])
    terms["gate"] = coord_gate_from_lse(coord_logits[:num_slots], lse[:num_slots])
    terms["text_gate"] = text_gate_from_lse(coord_logits[num_slots:], lse[num_slots:])
    ce = lse[num_slots:] - label_logits(h[num_slots:], weight, x["text_labels"])  # [M]
    token = weighted_mean(ce, torch.ones_like(ce))
    return token + sum(WEIGHTS[k] * v for k, v in terms.items())


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: str, args: argparse.Namespace) -> dict:
    """Run one path `repeats` times; min time, peak RSS above the inputs, last loss."""
    x = build_inputs(args.vocab, args.tokens, args.slots, args.hidden)
    objective = {"naive": naive_objective, "lean": lean_objective}[path]
    base = current_rss()
    times = []
    for _ in range(args.repeats):
        x["h"].grad = x["weight"].grad = None
        start = time.perf_counter()
        loss = objective(x)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "path": path,
        "seconds": min(times),
        "peak_mb": (peak - base) / 2**20,
        "loss": loss.item(),
        "grad_h_norm": x["h"].grad.norm().item(),
    }


def run_subprocess(path: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--path", path, *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=240)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--path", choices=["naive", "lean"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args)))
        return
    argv = [f"--{k}={getattr(args, k)}" for k in ("vocab", "tokens", "slots", "hidden", "repeats")]
    print(
        f"objective fwd+bwd: V={args.vocab} T={args.tokens} N={args.slots} D={args.hidden}, "
        f"{torch.get_num_threads()} threads, min of {args.repeats} runs"
    )
    results = {path: run_subprocess(path, argv) for path in ("naive", "lean")}
    for r in results.values():
        print(
            f"  {r['path']:5s}: {r['seconds']:7.2f} s  peak +{r['peak_mb']:8.1f} MiB  "
            f"loss {r['loss']:.6f}  |grad h| {r['grad_h_norm']:.6f}"
        )
    naive, lean = results["naive"], results["lean"]
    print(
        f"peak-memory ratio lean/naive: {lean['peak_mb'] / naive['peak_mb']:.3f} (target <= 0.25)"
    )
    print(f"time ratio lean/naive:        {lean['seconds'] / naive['seconds']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
