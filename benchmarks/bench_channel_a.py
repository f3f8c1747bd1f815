"""Channel A, fast vs reference, on an image-heavy shape; and against one Stage-1 step.

A tiny Qwen-VL of the notes' benchmark shape (hidden 256, 4 layers, vision depth 4), a batch of
2 synthetic 448 px images (a few hundred image tokens each) with ~30 objects, right padding.
One step = forward + backward of the seed run's objective (no optimizer). For n = 2 and 3,
with the tiny vocabulary and with a 152k one, it prints the median step time, fast/reference,
Channel-A/Stage-1 beside the ideal (P + n S) / (P + S) (P: the shared prefix, S: the rest), and
the memory kept for backward (autograd's saved tensors, de-duplicated by storage, parameters
excluded), fast/reference. `fast` is the default (the non-final passes recompute their suffix
in backward); `fast keep` keeps their activations instead (softctx_recompute: false).

    python benchmarks/bench_channel_a.py [--family qwen2_5_vl] [--repeats 5] [--vocabs 0,151936]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch
import transformers as T

from coordexp.config import Config, CoordSoftCEW1Config, Stage2ABConfig, TrainingConfig
from coordexp.data.collate import Collator
from coordexp.data.records import read_records
from coordexp.data.synthetic import SynthSpec, synthesize
from coordexp.model.qwen_vl import build_processor
from coordexp.model.tiny import TinySpec, build_tiny_tokenizer, tiny_config
from coordexp.train.stage1 import stage1_step
from coordexp.train.stage2 import channel_a_step

SHAPE = TinySpec(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=512, vision_depth=4,
                 vision_width=128)
SCENES = SynthSpec(image_size=448, min_objects=24, max_objects=30, min_size_frac=0.05,
                   max_size_frac=0.12, crowded_share=0.0)
SEED_COORD = CoordSoftCEW1Config(soft_ce_weight=0.1, w1_weight=0.1, target_truncate=8,
                                 gate_weight=1.0, bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.2)
# (row name, channel_a_impl, softctx_recompute): "fast keep" keeps every pass's activations
VARIANTS = (("fast", "fast", True), ("fast keep", "fast", False), ("reference", "reference", False))
SEED_STAGE2 = dict(bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.2, coord_gate_weight=1.0)


def build(family: str, vocab: int):
    tok = build_tiny_tokenizer()
    config = tiny_config(tok, SHAPE if family == "qwen2_5_vl" else
                         TinySpec(**{**SHAPE.__dict__, "family": family}))
    if vocab:
        config.text_config.vocab_size = vocab  # ids past the tokenizer's are never used
    torch.manual_seed(0)
    model = T.AutoModelForImageTextToText.from_config(config).train()
    collator = Collator(build_processor(family, tok))
    return model, collator, torch.tensor(collator.codec.token_ids(tok))


def saved_bytes(step) -> int:
    """Bytes autograd keeps for backward during step(), one count per storage, parameters
    excluded; tensors saved by branches freed before backward (detached ones) do not count."""
    saved = []

    def pack(t: torch.Tensor):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    params = {p.untyped_storage().data_ptr() for p in step.model.parameters()}
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (ref() for ref in saved) if t is not None}
    loss.backward()
    return sum(n for ptr, n in kept.items() if ptr not in params)


class Step:
    """One forward (+ backward in time()) of a Stage-1 or Channel-A step."""

    def __init__(self, model, batch, coord_ids, cfg: Config):
        self.model, self.batch, self.coord_ids, self.cfg = model, batch, coord_ids, cfg

    def __call__(self) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        if self.cfg.training.stage == "stage1":
            return stage1_step(self.model, self.batch, self.cfg, self.coord_ids).loss
        return channel_a_step(self.model, self.batch, self.cfg, self.coord_ids).loss

    def time(self) -> float:
        started = time.perf_counter()
        self().backward()
        return time.perf_counter() - started


def median_times(steps: dict[str, Step], repeats: int) -> dict[str, float]:
    """Median step time of each variant; rounds interleave the variants, so a drift in machine
    load hits them all alike and the ratios stay fair. The first round warms up."""
    times = {name: [] for name in steps}
    for _ in range(repeats + 1):
        for name, step in steps.items():
            times[name].append(step.time())
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def configs() -> dict[str, Config]:
    out = {"stage1": Config(coord_soft_ce_w1=SEED_COORD)}
    for n in (2, 3):
        for name, impl, recompute in VARIANTS:
            s = Stage2ABConfig(n_softctx_iter=n, channel_a_impl=impl, softctx_recompute=recompute,
                               **SEED_STAGE2)
            out[f"{name} n={n}"] = Config(coord_soft_ce_w1=SEED_COORD, stage2_ab=s,
                                          training=TrainingConfig(stage="stage2_ab"))
    return out


def bench(family: str, vocab: int, records, repeats: int) -> None:
    model, collator, coord_ids = build(family, vocab)
    batch = collator(records)
    T_len = batch.inputs["input_ids"].shape[1]
    P = int(batch.coord_t.min())
    image_tokens = int((batch.inputs["input_ids"] == model.config.image_token_id).sum()) // 2
    V = model.config.text_config.vocab_size
    print(f"\n{family}, vocab {V}: batch 2, L {T_len} = prefix P {P} + S {T_len - P}, "
          f"{image_tokens} image tokens and {len(batch.coord_t) // 8} objects per sample, "
          f"{int((batch.inputs['attention_mask'] == 0).sum())} pad tokens")
    steps = {name: Step(model, batch, coord_ids, cfg) for name, cfg in configs().items()}
    times = median_times(steps, repeats)
    rows = {name: (times[name], saved_bytes(step) / 2**20) for name, step in steps.items()}
    base = rows["stage1"][0]
    print(f"{'variant':>14} | {'median s':>8} | {'saved MiB':>9} | {'/Stage-1':>8} | "
          f"{'ideal':>5} | {'fast/ref time':>13} | {'fast/ref saved':>14}")
    print(f"{'stage1':>14} | {base:8.3f} | {rows['stage1'][1]:9.1f} | {1.0:8.2f} | {1.0:5.2f} |")
    for n in (2, 3):
        ideal = (P + n * (T_len - P)) / T_len
        tr, mr = rows[f"reference n={n}"]
        for name, _, _ in VARIANTS:
            t, m = rows[f"{name} n={n}"]
            versus = "" if name == "reference" else f" {t / tr:13.2f} | {m / mr:14.2f}"
            print(f"{f'{name} n={n}':>14} | {t:8.3f} | {m:9.1f} | {t / base:8.2f} | "
                  f"{ideal:5.2f} |{versus}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen3_vl"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocabs", default="0,151936", help="0 = the tiny tokenizer's size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, 2, 0, seed=1, spec=SCENES)
        records = read_records(Path(tmp) / "train.jsonl")
        for vocab in map(int, args.vocabs.split(",")):
            bench(args.family, vocab, records, args.repeats)


if __name__ == "__main__":
    main()
