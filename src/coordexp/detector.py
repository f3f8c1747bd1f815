"""`Detector`: a trained model that turns images into pixel boxes, labels and scores; the Python
face of `coordexp infer`. Also the one place that loads a model for inference (device, dtype,
attention) and the length-aware batch plan.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from tqdm import tqdm

from coordexp.artifacts import checkpoint_dir, latest_checkpoint
from coordexp.config import Config, DataConfig, EvalConfig, RolloutConfig
from coordexp.data.collate import load_image
from coordexp.data.images import to_rgb8
from coordexp.data.records import Record
from coordexp.errors import UserError
from coordexp.eval.predictions import Prediction
from coordexp.model.qwen_vl import load_vlm, resolve_model_dir
from coordexp.predict import prediction
from coordexp.rollout import generate_batch

MAX_NEW_TOKENS = 3084  # the seed's evaluation budget: room for ~150 objects per image
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION = ("sdpa", "flash_attention_2", "eager")
MODEL_FILES = ("config.json", "adapter_config.json")  # a plain HF model; a PEFT adapter


@dataclass(frozen=True)
class Detection:
    """One image's detections in emission order."""

    boxes: np.ndarray  # [P, 4] xyxy pixels of the image as given
    labels: list[str]
    scores: np.ndarray  # [P]
    prediction: Prediction  # the full record: raw text, parse counters, the pred JSONL line
    hit_max_new_tokens: bool  # the answer was cut by the token budget (its complete objects kept)

    @classmethod
    def of(cls, p: Prediction, hit_max_new_tokens: bool) -> Detection:
        return cls(p.boxes_px, list(p.descs), p.scores, p, hit_max_new_tokens)


class Detector:
    """`Detector.load(path, device="auto").predict(images)` -> one Detection per image."""

    def __init__(self, model, processor, *, field_order: str = "desc_first",
                 score: str = "coord_prob"):
        self.model = model.eval()
        self.processor = processor
        self.cfg = Config(data=DataConfig(field_order=field_order), eval=EvalConfig(score=score))

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto",
             attn_implementation: str = "sdpa", field_order: str = "desc_first") -> Detector:
        """A model directory, a training checkpoint, or a run directory (its best kept
        checkpoint, else its latest); `field_order` must be the one the model was trained
        with."""
        model, processor = load_model(path, device=device, dtype=dtype,
                                      attn_implementation=attn_implementation)
        return cls(model, processor, field_order=field_order)

    def predict(self, images: Sequence[str | Path | Image.Image], *, batch_size: int = 8,
                max_new_tokens: int = MAX_NEW_TOKENS, constrained: bool = False,
                repetition_penalty: float = 1.0, progress: bool = False) -> list[Detection]:
        """Greedy detections for image paths or PIL images (RGB pixels as stored: the EXIF
        orientation tag is not applied, as in training), in the order given."""
        rollout = rollout_config(batch_size, max_new_tokens, repetition_penalty, constrained)
        records, in_memory = image_inputs(images)
        out: list[Detection | None] = [None] * len(records)
        for batch, found in self.stream(records, plan_batches(records, batch_size), rollout,
                                        in_memory=in_memory, progress=progress):
            for i, d in zip(batch, found, strict=True):
                out[i] = d
        return out

    def stream(self, records: list[Record], batches: list[list[int]], rollout: RolloutConfig,
               *, in_memory: dict[int, Image.Image] | None = None,
               progress: bool = False) -> Iterator[tuple[list[int], list[Detection]]]:
        """(record indices, their detections) batch by batch; images are read from the
        records' files (`load_image`, as training does) unless given in `in_memory`."""
        in_memory = in_memory or {}
        total = sum(map(len, batches))
        start, objects = time.perf_counter(), 0
        with tqdm(total=total, desc="infer", unit="img", disable=not progress) as bar:
            for batch in batches:
                images = [in_memory[i] if i in in_memory else load_image(records[i])
                          for i in batch]
                found = self.predict_batch([records[i] for i in batch], images, rollout)
                objects += sum(len(d.labels) for d in found)
                bar.set_postfix_str(f"{objects / (time.perf_counter() - start):.1f} obj/s",
                                    refresh=False)
                bar.update(len(batch))  # the bar shows images/s itself
                yield batch, found

    def predict_batch(self, records: list[Record], images: list[Image.Image],
                      rollout: RolloutConfig) -> list[Detection]:
        """One generate call for these images; boxes in pixels of each record's size."""
        with torch.no_grad():
            rollouts = generate_batch(self.model, self.processor, images, rollout,
                                      self.cfg.data.field_order)
        return [Detection.of(prediction(r, ro, self.cfg), ro.hit_max_new_tokens)
                for r, ro in zip(records, rollouts, strict=True)]


def rollout_config(batch_size: int, max_new_tokens: int, repetition_penalty: float,
                   constrained: bool) -> RolloutConfig:
    """Greedy decoding settings, checked (the flag names are the CLI's)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError(f"--batch-size and --max-new-tokens must be >= 1, got {batch_size} and "
                        f"{max_new_tokens}")
    if not repetition_penalty > 0:
        raise UserError(f"--repetition-penalty must be > 0, got {repetition_penalty}")
    return RolloutConfig(batch_size=batch_size, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty, constrained=constrained)


# -- inputs and the batch plan ----------------------------------------------------------------
def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as `load_image` (training) sees the file: the pixels as stored, the EXIF
    orientation tag not applied (COCO annotations are in that frame too)."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def image_inputs(images: Sequence[str | Path | Image.Image]
                 ) -> tuple[list[Record], dict[int, Image.Image]]:
    """Records (image name, size) for paths and PIL images; the PIL ones, as RGB, by index."""
    records, in_memory = [], {}
    for i, x in enumerate(images):
        if isinstance(x, Image.Image):
            in_memory[i] = to_rgb8(x)
            records.append(Record("", x.width, x.height, ()))
        else:
            records.append(Record(str(x), *image_size(Path(x)), ()))
    return records, in_memory


def plan_batches(records: list[Record], batch_size: int) -> list[list[int]]:
    """Record indices in batches of similar image area (largest first, so memory trouble shows
    at once; ties in input order). The plan depends only on the inputs and batch_size, so every
    run over them (resumed, sharded, from Python) computes each batch identically."""
    order = sorted(range(len(records)), key=lambda i: (-records[i].width * records[i].height, i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


# -- loading ----------------------------------------------------------------------------------
def load_model(path: str | Path, *, device: str = "auto", dtype: str = "auto",
               attn_implementation: str = "sdpa"):
    """(model, processor) ready for inference: loaded in its dtype and moved to its device once."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_attention(attn_implementation, dev, torch_dtype)
    directory = model_dir(path)
    try:
        model, processor, _ = load_vlm(directory, dtype=torch_dtype,
                                       attn_implementation=attn_implementation)
    except (OSError, ValueError, SafetensorError) as e:  # unreadable config, truncated weights
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{directory}: cannot load the model ({reason})") from None
    return model.to(dev).eval().requires_grad_(False), processor


def model_dir(path: str | Path) -> Path:
    """A model directory (or a hub id in the local cache) or a training checkpoint (plain or
    adapter), or a run directory: its best checkpoint (by the eval metric) if that was kept,
    else its latest."""
    path = resolve_model_dir(path)
    if is_model_dir(path):
        return path
    if not (path / "checkpoints").is_dir():
        raise UserError(f"{path}: not a model directory, training checkpoint or run directory "
                        f"(no {' or '.join(MODEL_FILES)} and no checkpoints/)")
    latest = latest_checkpoint(path)
    state = latest / "trainer_state.json"
    best_step = json.loads(state.read_text()).get("best_step") if state.is_file() else None
    best = checkpoint_dir(path, best_step) if best_step else latest
    return best if is_model_dir(best) else latest


def is_model_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in MODEL_FILES)


def resolve_device(device: str) -> torch.device:
    """--device: auto (CUDA when present) | cpu | cuda | cuda:N."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible (use --device cpu)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype: auto (bf16 on a GPU that supports it, else fp32) | bf16 | fp16 | fp32."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_attention(name: str, device: torch.device, dtype: torch.dtype) -> None:
    if name not in ATTENTION:
        raise UserError(f"--attn must be one of {', '.join(ATTENTION)}; got {name!r}")
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("--attn flash_attention_2 needs the flash-attn package "
                        "(pip install flash-attn); the default sdpa needs nothing")
    if device.type != "cuda" or dtype == torch.float32:
        raise UserError("--attn flash_attention_2 runs on CUDA in bf16 or fp16 only")
