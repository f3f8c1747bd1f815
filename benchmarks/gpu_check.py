"""GPU check (not run by CI): the full Qwen3-VL-2B shape on one CUDA device, random weights
built offline, bf16, sdpa attention, per-layer checkpointing on.

One 768x768-budget image with ~30 objects. For full tuning and for DoRA (r16, a32, all linear
layers of LLM, ViT and aligner, coord rows trainable): median time and peak CUDA memory of a
Stage-1 step and of a Channel-A step (fast and reference, n = 1 and 2), each forward + backward +
AdamW step; then the rollout throughput of batch-8 greedy generation (generated tokens/s).
Prints one table; about 5 minutes on one H100-class GPU.

    python benchmarks/gpu_check.py [--repeats 3] [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

from coordexp.codec import CoordCodec
from coordexp.config import (
    Config,
    CoordSoftCEW1Config,
    LoraSettings,
    ModelConfig,
    RolloutConfig,
    Stage2ABConfig,
    TrainingConfig,
)
from coordexp.data.collate import Collator
from coordexp.data.records import read_records
from coordexp.data.synthetic import SynthSpec, synthesize
from coordexp.model.qwen_vl import build_image_processor, build_processor
from coordexp.model.tiny import TinySpec, build_tiny_tokenizer, tiny_config
from coordexp.model.tuning import apply_tuning, hf_model
from coordexp.rollout import generate_rollouts
from coordexp.train.engine import enable_checkpointing
from coordexp.train.stage1 import stage1_step
from coordexp.train.stage2 import channel_a_step

SCENE = SynthSpec(image_size=768, min_objects=28, max_objects=32, min_size_frac=0.04,
                  max_size_frac=0.12, crowded_share=0.0)
COORD = CoordSoftCEW1Config(soft_ce_weight=0.1, w1_weight=0.1, target_truncate=8)
STAGE2 = dict(bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.2, coord_gate_weight=1.0)


def qwen3_vl_2b_config(tok) -> T.PretrainedConfig:
    """The published Qwen3-VL-2B configuration (28 layers, 24 ViT blocks), offline."""
    config = tiny_config(tok, TinySpec(family="qwen3_vl", hidden=2048, layers=28, heads=16,
                                       kv_heads=8, intermediate=6144, vision_depth=24,
                                       vision_width=1024))
    text, vision = config.text_config, config.vision_config
    text.vocab_size = 151936
    text.rope_parameters = {"rope_type": "default", "rope_theta": 5e6,
                            "mrope_section": [24, 20, 20]}
    vision.intermediate_size, vision.num_heads, vision.num_position_embeddings = 4096, 16, 2304
    vision.deepstack_visual_indexes = [5, 11, 17]
    return config


def build(tuning: str, tok):
    torch.manual_seed(0)
    model = T.AutoModelForImageTextToText.from_config(
        qwen3_vl_2b_config(tok), attn_implementation="sdpa", dtype=torch.bfloat16)
    coord_ids = CoordCodec().token_ids(tok)
    model = apply_tuning(model, ModelConfig(tuning=tuning, lora=LoraSettings(r=16, alpha=32)),
                         coord_ids, ".")
    enable_checkpointing(model)
    return model.cuda().train(), torch.tensor(coord_ids, device="cuda")


def step_configs() -> dict[str, Config]:
    out = {"stage1": Config(coord_soft_ce_w1=COORD)}
    for n in (1, 2):
        for impl in ("fast", "reference"):
            out[f"A {impl} n={n}"] = Config(
                coord_soft_ce_w1=COORD, training=TrainingConfig(stage="stage2_ab"),
                stage2_ab=Stage2ABConfig(n_softctx_iter=n, channel_a_impl=impl, **STAGE2))
    return out


def measure(model, batch, coord_ids, cfg: Config, repeats: int) -> tuple[float, float]:
    """Median seconds and peak GiB of forward + backward + optimizer step."""
    hf = hf_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats + 1):  # the first round warms up
        torch.cuda.synchronize()
        started = time.perf_counter()
        step = stage1_step if cfg.training.stage == "stage1" else channel_a_step
        step(hf, batch, cfg, coord_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), torch.cuda.max_memory_allocated() / 2**30


def rollout_rate(model, processor, records, max_new_tokens: int) -> float:
    """Generated tokens per second of batch-8 greedy generation."""
    cfg = RolloutConfig(batch_size=8, max_new_tokens=max_new_tokens)
    generate_rollouts(hf_model(model), processor, records[:8], cfg, progress=False)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    rollouts = generate_rollouts(hf_model(model), processor, records[:8], cfg, progress=False)
    torch.cuda.synchronize()
    return sum(len(r.token_ids) for r in rollouts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "gpu_check.py needs a CUDA device"
    tok = build_tiny_tokenizer()
    processor = build_processor("qwen3_vl", tok, build_image_processor(
        "qwen3_vl", max_pixels=768 * 768))
    collator = Collator(processor)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, 8, 0, seed=1, spec=SCENE)
        records = read_records(Path(tmp) / "train.jsonl")
        batch = collator(records[:1]).to("cuda")
        batch.inputs["pixel_values"] = batch.inputs["pixel_values"].to(torch.bfloat16)
        print(f"Qwen3-VL-2B (random weights), bf16, sdpa, checkpointing on; one sample of "
              f"{batch.inputs['input_ids'].shape[1]} tokens, {len(records[0].objects)} objects")
        print(f"{'tuning':>6} | {'step':>16} | {'median s':>8} | {'peak GiB':>8}")
        for tuning in ("full", "dora"):
            model, coord_ids = build(tuning, tok)
            for name, cfg in step_configs().items():
                seconds, peak = measure(model, batch, coord_ids, cfg, args.repeats)
                print(f"{tuning:>6} | {name:>16} | {seconds:8.3f} | {peak:8.2f}")
            rate = rollout_rate(model, processor, records, args.max_new_tokens)
            print(f"{tuning:>6} | {'rollout batch 8':>16} | {rate:8.0f} tokens/s")
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
