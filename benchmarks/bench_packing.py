"""Stage-1 training throughput, right-padded batches vs static packing, on a COCO-like mix.

Samples: object counts at evenly spaced quantiles of a log-normal fit of COCO train (median 4,
mean about 6.5, a long tail capped at 60), images of 392-560 px a side (196-400 image tokens on
Qwen2.5-VL), random boxes with COCO class names, answers tokenized as the real Qwen tokenizer
does (--vocab, below). The same samples go through both modes in one run on this machine:
- padded: batches of --batch samples in a seeded random order (as training.packing=none);
- packed: the static pack plan's rows of up to --packing-length tokens, one row per step
  (as training.packing=static).
One step = encode the records (+ pack) + the Stage-1 forward + backward (no optimizer). It
prints real (non-padding) tokens per second of wall time and of this process's CPU time (the
machine may be shared: CPU time is what the work itself cost), and the padding share of the
token slots computed. Packed rows run sdpa per sample (model/packed_attention.py).

    python benchmarks/bench_packing.py [--samples 96] [--batch 8] [--packing-length 2048]
                                       [--vocab qwen-cut|tiny|qwen]
"""

from __future__ import annotations

import argparse
import math
import random
import re
import tempfile
import time
from pathlib import Path
from statistics import NormalDist

import torch
import transformers as T
from PIL import Image
from tokenizers import Tokenizer, models

from coordexp.codec import CoordCodec
from coordexp.config import Config, TrainingConfig
from coordexp.data.collate import Collator
from coordexp.data.packing import plan_packs
from coordexp.data.records import DetObject, Record
from coordexp.data.render import render_record
from coordexp.model.qwen_vl import build_processor
from coordexp.model.tiny import CHAT_TEMPLATE, TinySpec, build_tiny_tokenizer, tiny_config
from coordexp.model.tokenizer import as_hf_tokenizer, build_qwen_tokenizer
from coordexp.train.stage1 import stage1_step

# LM width / MLP ratio closer to a real Qwen-VL than the test models' (attention's share of the
# cost shrinks with width); a small vision tower (its cost is the same in both modes)
SHAPE = TinySpec(hidden=512, layers=2, heads=8, kv_heads=4, intermediate=1536, vision_depth=1,
                 vision_width=64)
CLASSES = ("person", "car", "chair", "book", "bottle", "cup", "dining table", "traffic light",
           "bowl", "handbag", "umbrella", "bird", "boat", "truck", "bench", "sheep")


def object_counts(n: int, rng: random.Random) -> list[int]:
    """n object counts at evenly spaced quantiles of a log-normal fit of COCO train (median 4,
    mean about 6.5, capped at 60), shuffled: a small sample with the whole distribution's
    shape, tail included."""
    quantiles = [NormalDist(math.log(4), 0.95).inv_cdf((i + 0.5) / n) for i in range(n)]
    counts = [min(60, max(1, round(math.exp(q)))) for q in quantiles]
    rng.shuffle(counts)
    return counts


def coco_like_records(n: int, root: Path, seed: int) -> list[Record]:
    """n records with COCO-like object counts and image sizes; plain images (content does not
    change the cost)."""
    rng = random.Random(seed)
    counts = object_counts(n, rng)
    records = []
    for i, count in enumerate(counts):
        w, h = 28 * rng.randint(14, 20), 28 * rng.randint(14, 20)
        Image.new("RGB", (w, h), (30, 30, 30)).save(root / f"{i}.png")
        objects = []
        for _ in range(count):
            x1, y1 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
            box = (x1, y1, rng.uniform(x1 + 10, w - 1), rng.uniform(y1 + 10, h - 1))
            objects.append(DetObject(rng.choice(CLASSES), box))
        records.append(Record(f"{i}.png", w, h, tuple(objects), root))
    return records


def bpe_merges(word: str, rank: dict[str, int]) -> list[tuple[str, str]]:
    """The merges byte-level BPE applies to one pre-token, in order: always the adjacent pair
    whose concatenation has the lowest rank (tiktoken's rule, which the Qwen vocabulary uses)."""
    parts, applied = list(word), []
    while len(parts) > 1:
        best, i = min((rank.get(a + b, math.inf), i) for i, (a, b) in
                      enumerate(zip(parts, parts[1:], strict=False)))
        if best == math.inf:
            break
        applied.append((parts[i], parts[i + 1]))
        parts[i: i + 2] = [parts[i] + parts[i + 1]]
    return applied


def qwen_cut_tokenizer(full, texts: list[str]):
    """The real Qwen vocabulary `full` cut down to the merges `texts` use: it splits these texts
    into exactly the real tokens (a merge it lacks is one BPE never applied to them), with a
    vocabulary of a few hundred, so a small model's LM head costs what a small head costs."""
    rank, backend = full.get_vocab(), full.backend_tokenizer
    words = {w for t in texts for w, _ in backend.pre_tokenizer.pre_tokenize_str(
        backend.normalizer.normalize_str(t))}
    merges = sorted({m for w in words for m in bpe_merges(w, rank)},
                    key=lambda m: rank[m[0] + m[1]])
    alphabet = [w for w in rank if len(w) == 1]  # the 256 byte symbols
    vocab = {t: i for i, t in enumerate(dict.fromkeys(alphabet + [a + b for a, b in merges]))}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = \
        backend.normalizer, backend.pre_tokenizer, backend.decoder
    return as_hf_tokenizer(tok, CHAT_TEMPLATE)


def tokenizer_for(vocab: str, records: list[Record]):
    """tiny: the test tokenizer; qwen: the real 151k Qwen vocabulary; qwen-cut: the real Qwen
    tokens of these samples (checked sample by sample) from a vocabulary of a few hundred."""
    if vocab == "tiny":
        return build_tiny_tokenizer()
    full = build_qwen_tokenizer(CHAT_TEMPLATE)
    if vocab == "qwen":
        return full
    full_collator = Collator(build_processor("qwen2_5_vl", full, None))
    text = "".join(render_record(r, CoordCodec()) for r in records) + full_collator.prompt_text()
    cut = qwen_cut_tokenizer(full, re.split(r"<\|[a-z_0-9]+\|>", text))  # added tokens cut out
    cut_collator = Collator(build_processor("qwen2_5_vl", cut, None))
    assert all(cut_collator.sample_length(r) == full_collator.sample_length(r) for r in records), \
        "the cut vocabulary splits these samples otherwise"
    return cut


def padded_batches(n: int, batch: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i: i + batch] for i in range(0, n, batch)]


class Mode:
    """One way of stepping through the samples: its groups (one micro-batch each) and what
    its steps measured so far."""

    def __init__(self, groups: list[list[int]], cfg: Config):
        self.groups, self.cfg, self.done = groups, cfg, 0
        self.seconds = self.cpu_seconds = 0.0
        self.samples = self.real = self.slots = 0

    def step(self, model, collator, records, coord_ids) -> None:
        """Encode (+ pack) + forward + backward of the next group, timed."""
        group = self.groups[self.done]
        started, cpu_started = time.perf_counter(), time.process_time()
        batch = collator([records[i] for i in group])
        model.zero_grad(set_to_none=True)
        stage1_step(model, batch, self.cfg, coord_ids).loss.backward()
        self.seconds += time.perf_counter() - started
        self.cpu_seconds += time.process_time() - cpu_started
        lengths = batch.inputs["attention_mask"].sum(1)
        self.done, self.samples, self.real = self.done + 1, self.samples + len(group), \
            self.real + int(lengths.sum())
        packed = self.cfg.training.packing == "static"  # one row per step: the pack's tokens
        self.slots += int(lengths.sum()) if packed else batch.inputs["input_ids"].numel()


def run_interleaved(modes: dict[str, Mode], model, collator, records, coord_ids) -> None:
    """Step whichever mode has seen fewer samples, so a drift in machine load (the CPU is
    shared) hits both alike."""
    while any(m.done < len(m.groups) for m in modes.values()):
        mode = min((m for m in modes.values() if m.done < len(m.groups)),
                   key=lambda m: m.samples)
        mode.step(model, collator, records, coord_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--packing-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", choices=("qwen-cut", "tiny", "qwen"), default="qwen-cut",
                        help="how answers are tokenized: qwen-cut (default) the real Qwen tokens "
                        "(25-27 an object) from a vocabulary cut to what the samples use; tiny "
                        "the test tokenizer (about 15 an object: it merges JSON punctuation); "
                        "qwen the real 152k vocabulary (its LM head then dominates the cost)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        records = coco_like_records(args.samples, Path(tmp), seed=0)
        tok = tokenizer_for(args.vocab, records)
        torch.manual_seed(0)
        model = T.AutoModelForImageTextToText.from_config(tiny_config(tok, SHAPE)).train()
        collator = Collator(build_processor("qwen2_5_vl", tok, None))
        coord_ids = torch.tensor(CoordCodec().token_ids(tok))
        lengths = [collator.sample_length(r) for r in records]
        counts = sorted(len(r.objects) for r in records)
        print(f"{len(records)} samples: objects median {counts[len(counts) // 2]}, max "
              f"{counts[-1]}; tokens per sample {min(lengths)}-{max(lengths)}, mean "
              f"{sum(lengths) / len(lengths):.0f}")
        packs = plan_packs(lengths, args.packing_length)
        modes = {
            f"padded (batch {args.batch})": Mode(
                padded_batches(len(records), args.batch, 0), Config()),
            f"packed (rows <= {args.packing_length})": Mode(packs, Config(
                training=TrainingConfig(packing="static", packing_length=args.packing_length,
                                        per_device_batch_size=1))),
        }
        for mode in modes.values():  # warm-up: one step each, not counted
            Mode(mode.groups[:1], mode.cfg).step(model, collator, records, coord_ids)
        run_interleaved(modes, model, collator, records, coord_ids)
    base = next(iter(modes.values()))
    print(f"{'mode':>24} | {'steps':>5} | {'tokens':>6} | {'padding':>7} | {'wall s':>6} | "
          f"{'tokens/s':>8} | {'vs padded':>9} | {'CPU s':>6} | {'tokens/CPU s':>12} | "
          f"{'vs padded':>9}")
    for name, m in modes.items():
        wall, cpu = m.real / m.seconds, m.real / m.cpu_seconds
        print(f"{name:>24} | {m.done:5d} | {m.real:6d} | {1 - m.real / m.slots:7.1%} | "
              f"{m.seconds:6.1f} | {wall:8.1f} | {wall / (base.real / base.seconds):9.2f} | "
              f"{m.cpu_seconds:6.1f} | {cpu:12.1f} | "
              f"{cpu / (base.real / base.cpu_seconds):9.2f}")
    bound = base.slots / base.real  # = 1 / (1 - padded padding share)
    print(f"padding-free bound on the ratio (every padded slot costing a real token's time): "
          f"{bound:.2f}")
    fill = sum(lengths) / (len(packs) * args.packing_length)
    print(f"pack plan: {len(packs)} rows, {len(records) / len(packs):.1f} samples and "
          f"{fill:.1%} of packing_length per row")


if __name__ == "__main__":
    main()
