"""Memory of one Stage-1 step at the real Qwen3-VL-2B widths: full vs LoRA vs DoRA, per-layer
checkpointing off vs on, and FSDP on 2 ranks vs 1.

The model has Qwen3-VL-2B's published widths (LLM hidden 2048, MLP 6144, 16 heads / 8 KV heads
of 128, vocabulary 151936, tied head; ViT width 1024, MLP 4096, 16 heads, patch 16, merge 2,
2304 position embeddings) but only `--layers` decoder layers and `--vision-depth` ViT blocks, so
it fits a small CPU machine. The sample: one 512 px image (256 image tokens, 1024 ViT patches)
and an answer of ~210 objects, about 2k tokens. Measured, in one run:
- parameters (trainable and total), and bytes of parameters, gradients and AdamW state after
  one optimizer step, per rank;
- activations kept for backward: autograd's saved tensors during the forward, one count per
  storage, parameters excluded (under checkpointing: what the layers keep, not the replay);
- the adapter checkpoint's size on disk against the full model directory's;
- under FSDP on 2 ranks (torchrun, gloo, a short sample: these bytes do not depend on length),
  the per-rank parameter + gradient + optimizer bytes against the 1-rank run.

    python benchmarks/bench_memory.py [--layers 2] [--vision-depth 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
import transformers as T

from coordexp.codec import CoordCodec
from coordexp.config import Config, CoordSoftCEW1Config, LoraSettings, ModelConfig
from coordexp.data.collate import Collator
from coordexp.data.records import read_records
from coordexp.data.synthetic import SynthSpec, synthesize
from coordexp.model.qwen_vl import build_image_processor, build_processor
from coordexp.model.tiny import TinySpec, build_tiny_tokenizer, tiny_config
from coordexp.model.tuning import apply_tuning, hf_model, save_adapter
from coordexp.train.engine import StepModule, enable_checkpointing, wrap
from coordexp.train.stage1 import stage1_step

SEED_COORD = CoordSoftCEW1Config(soft_ce_weight=1.0, w1_weight=3.0, gate_weight=5.0,
                                 temperature=0.9, target_sigma=1.5, target_truncate=8)
LONG = SynthSpec(image_size=512, min_objects=200, max_objects=220, min_size_frac=0.02,
                 max_size_frac=0.04, crowded_share=0.0)
SHORT = SynthSpec(image_size=64, min_objects=1, max_objects=1)
MiB = 2**20


def qwen3_vl_2b(tok, layers: int, vision_depth: int) -> T.PretrainedConfig:
    """Qwen3-VL-2B's published widths with fewer layers."""
    spec = TinySpec(family="qwen3_vl", hidden=2048, layers=layers, heads=16, kv_heads=8,
                    intermediate=6144, vision_depth=vision_depth, vision_width=1024)
    config = tiny_config(tok, spec)
    text, vision = config.text_config, config.vision_config
    text.vocab_size = 151936  # ids past the tiny tokenizer's are never fed
    text.rope_parameters = {"rope_type": "default", "rope_theta": 5e6,
                            "mrope_section": [24, 20, 20]}
    vision.intermediate_size, vision.num_heads, vision.num_position_embeddings = 4096, 16, 2304
    vision.deepstack_visual_indexes = list(range(min(3, vision_depth)))
    return config


def build(args, tuning: str, base_dir: Path):
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = T.AutoModelForImageTextToText.from_config(
        qwen3_vl_2b(tok, args.layers, args.vision_depth), attn_implementation="sdpa")
    coord_ids = CoordCodec().token_ids(tok)
    model = apply_tuning(model, ModelConfig(tuning=tuning, lora=LoraSettings(r=16, alpha=32)),
                         coord_ids, base_dir).train()
    collator = Collator(build_processor("qwen3_vl", tok, build_image_processor(
        "qwen3_vl", max_pixels=512 * 512)))
    return model, collator, torch.tensor(coord_ids)


def tensor_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t
    return local.numel() * local.element_size()


def state_bytes(model, optimizer) -> dict[str, int]:
    params = list(model.parameters())
    return {"params": sum(tensor_bytes(p) for p in params),
            "grads": sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
            "optim": sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)}


def saved_bytes(model, step) -> int:
    """Bytes autograd keeps for backward during step(), one count per storage, parameters
    excluded; the graph is dropped afterwards without a backward."""
    saved = []

    def pack(t: torch.Tensor):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (ref() for ref in saved) if t is not None}
    del loss
    return sum(n for ptr, n in kept.items() if ptr not in params)


def one_rank(args, tuning: str, long_records, short_records, tmp: Path) -> dict:
    """Counts, optimizer-step bytes and kept activations (checkpointing off, on) of one tuning."""
    model, collator, coord_ids = build(args, tuning, tmp.parent / "base")
    hf, cfg = hf_model(model), Config(coord_soft_ce_w1=SEED_COORD)
    row = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "total": sum(p.numel() for p in model.parameters())}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    stage1_step(hf, collator(short_records), cfg, coord_ids).loss.backward()
    optimizer.step()
    row |= state_bytes(model, optimizer)
    del optimizer
    model.zero_grad(set_to_none=True)
    long_batch = collator(long_records)
    row["tokens"] = int(long_batch.inputs["input_ids"].shape[1])
    row["act_off"] = saved_bytes(model, lambda: stage1_step(hf, long_batch, cfg, coord_ids).loss)
    enable_checkpointing(model)
    row["act_on"] = saved_bytes(model, lambda: stage1_step(hf, long_batch, cfg, coord_ids).loss)
    out = tmp / tuning
    if tuning == "full":
        hf.save_pretrained(out)
    else:
        save_adapter(model, out)
    row["disk"] = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return row


def one_rank_worker(args) -> None:
    """In a subprocess: one tuning's row as JSON (the memory is returned when it exits)."""
    data = Path(args.one_rank)
    row = one_rank(args, args.tuning, read_records(data / "long" / "train.jsonl"),
                   read_records(data / "short" / "train.jsonl"), data / args.tuning)
    print("ROW " + json.dumps(row))


def run_worker(flags: list[str], args, nproc: int = 1) -> dict:
    """The JSON row a worker (this file, under torchrun when nproc > 1) prints."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={port}"] if nproc > 1 else []
    result = subprocess.run(
        [sys.executable, *launcher, __file__, *flags, "--layers", str(args.layers),
         "--vision-depth", str(args.vision_depth), "--threads", str(args.threads)],
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads if nproc == 1 else 1)},
        capture_output=True, text=True, check=True)
    line = next(x for x in result.stdout.splitlines() if x.startswith("ROW "))
    return json.loads(line.removeprefix("ROW "))


def fsdp_worker(args) -> None:
    """Under torchrun: the full-tuning model sharded by FSDP2 over the ranks, one step."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    records = read_records(Path(args.fsdp_worker) / "train.jsonl")
    model, collator, coord_ids = build(args, "full", Path(args.fsdp_worker) / "base")
    hf, cfg = hf_model(model), Config(coord_soft_ce_w1=SEED_COORD)
    step = StepModule(model, lambda recs, _: stage1_step(hf, collator(recs), cfg, coord_ids))
    engine = wrap(step, "fsdp", accelerator.num_processes, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    loss, _ = engine(records, 0)
    loss.backward()
    optimizer.step()
    row = state_bytes(model, optimizer)
    if accelerator.is_main_process:
        print("ROW " + json.dumps(row))


def report(rows: dict[str, dict], fsdp: dict, args) -> None:
    full = rows["full"]
    tokens = full["tokens"]
    print(f"\nQwen3-VL-2B widths, {args.layers} decoder layers, {args.vision_depth} ViT blocks; "
          f"Stage-1 step on one sample of {tokens} tokens (one 512 px image)")
    print(f"{'tuning':>6} | {'trainable':>11} | {'of total':>8} | {'params MiB':>10} | "
          f"{'grads MiB':>9} | {'AdamW MiB':>9} | {'act off MiB':>11} | {'act on MiB':>10} | "
          f"{'on/off':>6} | {'disk MiB':>8}")
    for name, r in rows.items():
        print(f"{name:>6} | {r['trainable']:11,d} | {r['trainable'] / r['total']:8.4f} | "
              f"{r['params'] / MiB:10.1f} | {r['grads'] / MiB:9.1f} | {r['optim'] / MiB:9.1f} | "
              f"{r['act_off'] / MiB:11.1f} | {r['act_on'] / MiB:10.1f} | "
              f"{r['act_on'] / r['act_off']:6.3f} | {r['disk'] / MiB:8.1f}")
    per_rank = {k: full[k] for k in ("params", "grads", "optim")}
    print(f"{'FSDP 2':>6} | per rank: params {fsdp['params'] / MiB:.1f} MiB, grads "
          f"{fsdp['grads'] / MiB:.1f} MiB, AdamW {fsdp['optim'] / MiB:.1f} MiB")
    dora, lora = rows["dora"], rows["lora"]
    print("\nratios (target):")
    print(f"  trainable parameters, DoRA all-linear / full: "
          f"{dora['trainable'] / full['trainable']:.4f} (<= 0.02)")
    print(f"  gradient + optimizer bytes, LoRA / full: "
          f"{(lora['grads'] + lora['optim']) / (full['grads'] + full['optim']):.4f} (<= 0.05)")
    print(f"  per-rank parameter + gradient + optimizer bytes, FSDP 2 ranks / 1 rank: "
          f"{sum(fsdp.values()) / sum(per_rank.values()):.4f} (<= 0.55)")
    print(f"  activations kept, checkpointing on / off (Stage 1, full): "
          f"{full['act_on'] / full['act_off']:.4f} (<= 0.35)")
    print(f"  adapter checkpoint on disk, DoRA / full model: "
          f"{dora['disk'] / full['disk']:.4f} (<= 0.05)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fsdp-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--one-rank", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tuning", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fsdp_worker:
        return fsdp_worker(args)
    if args.one_rank:
        return one_rank_worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "long", 1, 0, seed=1, spec=LONG)
        synthesize(tmp / "short", 2, 0, seed=1, spec=SHORT)
        rows = {tuning: run_worker(["--one-rank", str(tmp), "--tuning", tuning], args)
                for tuning in ("full", "lora", "dora")}
        report(rows, run_worker(["--fsdp-worker", str(tmp / "short")], args, nproc=2), args)


if __name__ == "__main__":
    main()
