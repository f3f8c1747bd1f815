"""Rollout speed: generated tokens/s at batch 1 and 16, the cost of the CoordJSON grammar
(constrained over free decoding, per decode step), and the parse failures of each.

Without --model, a tiny Qwen2.5-VL is first trained for --steps Stage-1 steps on synthetic
shapes, so the rollouts look like a young detector's (mostly well-formed, not always).
Free and constrained runs alternate, best of --repeats each, in this one process.

    python benchmarks/bench_rollout.py [--model DIR] [--steps 150] [--records 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from coordexp.codec import CoordCodec
from coordexp.config import Config, RolloutConfig
from coordexp.data.collate import Collator
from coordexp.data.records import read_records
from coordexp.data.synthetic import SynthSpec, synthesize
from coordexp.grammar import coordjson_grammar
from coordexp.model.adapter import init_coord_embeddings_ordinal
from coordexp.model.qwen_vl import build_processor, load_vlm
from coordexp.model.tiny import TinySpec, build_tiny_model, build_tiny_tokenizer
from coordexp.parsing import parse_coordjson_tokens
from coordexp.rollout import generate_rollouts
from coordexp.train.stage1 import stage1_step


def train_tiny(data: Path, steps: int, batch_size: int):
    """A tiny model after a few Stage-1 steps (seeded)."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, TinySpec(), seed=0)
    coord_ids = CoordCodec().token_ids(tok)
    init_coord_embeddings_ordinal(model, coord_ids)
    coord_ids_t = torch.tensor(coord_ids)
    processor = build_processor("qwen2_5_vl", tok)
    collator, cfg = Collator(processor), Config()
    records = read_records(data / "train.jsonl")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(records), (batch_size,), generator=gen).tolist()
        out = stage1_step(model, collator([records[i] for i in idx]), cfg, coord_ids_t)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step:3d}  loss {out.loss.item():.3f}")
    print(f"  {steps} steps in {time.perf_counter() - start:.1f} s")
    return model.eval(), processor


def measure(model, processor, records, batch_size: int, max_new_tokens: int,
            constrained: bool) -> dict:
    cfg = RolloutConfig(batch_size=batch_size, max_new_tokens=max_new_tokens,
                        constrained=constrained)
    start = time.perf_counter()
    rollouts = generate_rollouts(model, processor, records, cfg, progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in rollouts)
    # decode steps: the longest row of each batch, plus its end-of-turn step when it stopped
    lengths = [len(r.token_ids) + (not r.hit_max_new_tokens) for r in rollouts]
    steps = sum(max(lengths[i:i + batch_size]) for i in range(0, len(lengths), batch_size))
    parsed = [parse_coordjson_tokens(r.pieces) for r in rollouts]
    # a failure: no container, a dropped object, or JSON left open (ended early or out of budget)
    failed = sum(p.invalid_rollout or p.dropped_invalid > 0 or p.truncated for p in parsed)
    return {"seconds": seconds, "tokens": tokens, "steps": steps, "rollouts": len(rollouts),
            "batches": -(-len(rollouts) // batch_size),
            "failed": failed, "truncated": sum(p.truncated for p in parsed),
            "objects": sum(len(p.objects) for p in parsed)}


def best_of(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved model directory (default: train a tiny one)")
    parser.add_argument("--steps", type=int, default=150,
                        help="Stage-1 steps of the tiny model (~150: format mostly learnt)")
    parser.add_argument("--records", type=int, default=32, help="validation images rolled out")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (tiny decode steps run fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        synthesize(data, 192, args.records, seed=0,
                   spec=SynthSpec(image_size=112, max_objects=4, crowded_share=0.0))
        records = read_records(data / "val.jsonl")
        if args.model:
            model, processor, _ = load_vlm(args.model)
        else:
            print(f"training a tiny Qwen2.5-VL for {args.steps} Stage-1 steps (batch 8, 112 px)")
            model, processor = train_tiny(data, args.steps, batch_size=8)
        run_all(model, processor, records, args)


def run_all(model, processor, records, args) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    start = time.perf_counter()
    grammar = coordjson_grammar(processor.tokenizer, "desc_first", vocab)
    print(f"grammar: {grammar.allowed.shape[0]} states x {vocab} tokens, built in "
          f"{time.perf_counter() - start:.2f} s (once per tokenizer)")
    results, prefill = {}, {}
    with torch.no_grad():
        measure(model, processor, records[:2], 2, 8, True)  # warm-up
        for batch_size in (1, 16):
            prefill[batch_size] = best_of([measure(model, processor, records, batch_size, 1, False)
                                           for _ in range(args.repeats)])["seconds"]
            for _ in range(args.repeats):
                for constrained in (False, True):
                    r = measure(model, processor, records, batch_size, args.max_new_tokens,
                                constrained)
                    results.setdefault((batch_size, constrained), []).append(r)
    print_table({k: best_of(v) for k, v in results.items()}, prefill, args)


def decode_ms_per_step(r: dict, prefill_seconds: float) -> float:
    """Time per decode step after the prefill (prompt + image + first token), measured apart."""
    return 1e3 * (r["seconds"] - prefill_seconds) / max(1, r["steps"] - r["batches"])


def print_table(best: dict, prefill: dict, args) -> None:
    print(f"\n{next(iter(best.values()))['rollouts']} images, "
          f"max_new_tokens {args.max_new_tokens}, {torch.get_num_threads()} thread(s), "
          f"best of {args.repeats}; prefill (batch 1 / 16): {prefill[1]:.2f} / {prefill[16]:.2f} s")
    print(f"{'mode':<12}{'batch':>6}{'seconds':>9}{'tokens':>8}{'tok/s':>8}{'ms/step':>9}"
          f"{'objects':>9}{'parse fail':>12}{'truncated':>11}")
    for (batch_size, constrained), r in sorted(best.items()):
        mode = "constrained" if constrained else "free"
        print(f"{mode:<12}{batch_size:>6}{r['seconds']:>9.2f}{r['tokens']:>8}"
              f"{r['tokens'] / r['seconds']:>8.0f}"
              f"{decode_ms_per_step(r, prefill[batch_size]):>9.2f}"
              f"{r['objects']:>9}{r['failed'] / r['rollouts']:>12.1%}"
              f"{r['truncated'] / r['rollouts']:>11.1%}")
    free16, free1 = best[(16, False)], best[(1, False)]
    speedup = (free16["tokens"] / free16["seconds"]) / (free1["tokens"] / free1["seconds"])
    print(f"\nbatch 16 over batch 1 (free, tokens/s): {speedup:.2f}x")
    for batch_size in (1, 16):
        c, f, p = best[(batch_size, True)], best[(batch_size, False)], prefill[batch_size]
        ratio = decode_ms_per_step(c, p) / decode_ms_per_step(f, p)
        print(f"constrained/free at batch {batch_size:>2}: {ratio:.3f} per decode step "
              f"(target <= 1.15), {c['seconds'] / f['seconds']:.3f} wall")


if __name__ == "__main__":
    main()
