"""GPU inference check (needs CUDA): `Detector.load(device="auto")` puts a tiny Qwen2.5-VL on
the GPU in bf16 (asserted from the parameters), its greedy constrained predictions equal the
fp32 CPU ones (labels and boxes; scores within 0.05), and images/s on the GPU over the CPU in
this one run. The same assertions run as tests/test_infer.py::test_gpu_runs_in_bf16_and_agrees_
with_fp32_cpu where a GPU is present.

    python benchmarks/gpu_infer_check.py [--images 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from coordexp import Detector
from coordexp.data.synthetic import SynthSpec, synthesize
from coordexp.model.qwen_vl import build_processor, save_vlm
from coordexp.model.tiny import TinySpec, build_tiny_model, build_tiny_tokenizer

OPTS = dict(max_new_tokens=48, constrained=True)


def timed(detector: Detector, paths: list[Path], batch_size: int):
    detector.predict(paths[:batch_size], batch_size=batch_size, **OPTS)  # warm-up
    if detector.model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = detector.predict(paths, batch_size=batch_size, **OPTS)
    if detector.model.device.type == "cuda":
        torch.cuda.synchronize()
    return out, len(paths) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tiny_tokenizer()
        model_dir = Path(tmp) / "tiny"
        save_vlm(build_tiny_model(tok, TinySpec(family="qwen2_5_vl"), seed=3),
                 build_processor("qwen2_5_vl", tok), model_dir)
        synthesize(Path(tmp) / "data", 0, args.images, seed=0, spec=SynthSpec(image_size=112))
        paths = sorted((Path(tmp) / "data").rglob("*.png"))
        gpu = Detector.load(model_dir, device="auto")
        devices = {p.device.type for p in gpu.model.parameters()}
        dtypes = {p.dtype for p in gpu.model.parameters()}
        print(f"auto: parameters on {devices} in {dtypes} "
              f"({torch.cuda.get_device_name()}, attention "
              f"{gpu.model.config._attn_implementation})")
        assert devices == {"cuda"} and dtypes == {torch.bfloat16}
        cpu = Detector.load(model_dir, device="cpu", dtype="fp32")
        on_gpu, gpu_rate = timed(gpu, paths, args.batch_size)
        on_cpu, cpu_rate = timed(cpu, paths, args.batch_size)
    same = [g.labels == c.labels and g.boxes.tolist() == c.boxes.tolist()
            for g, c in zip(on_gpu, on_cpu, strict=True)]
    gaps = [float(np.abs(g.scores - c.scores).max()) for g, c, s in zip(on_gpu, on_cpu, same,
                                                                        strict=True)
            if s and len(g.scores)]
    print(f"greedy bf16 GPU == fp32 CPU (labels and boxes) on {sum(same)}/{len(same)} images; "
          f"largest score gap {max(gaps, default=0.0):.4f}")
    print(f"images/s: GPU bf16 {gpu_rate:.1f}, CPU fp32 {cpu_rate:.1f}, ratio "
          f"{gpu_rate / cpu_rate:.1f}x (batch {args.batch_size}, {OPTS['max_new_tokens']} new "
          "tokens, constrained)")
    assert all(same) and max(gaps, default=0.0) < 0.05
    return 0


if __name__ == "__main__":
    sys.exit(main())
