"""Qwen-VL processors without torchvision, and loading/saving a VLM + processor directory."""

from __future__ import annotations

import re
from pathlib import Path

import transformers as T
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError

from coordexp.errors import UserError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as on the Hugging Face hub
PROCESSORS = {"qwen2_5_vl": T.Qwen2_5_VLProcessor, "qwen2_vl": T.Qwen2VLProcessor,
              "qwen3_vl": T.Qwen3VLProcessor}


def _image_only(base: type) -> type:
    """A processor subclass without a video processor (the stock ones need torchvision)."""

    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kw)

    ImageOnly.__name__ = ImageOnly.__qualname__ = "ImageOnly" + base.__name__
    return ImageOnly


IMAGE_ONLY = {family: _image_only(cls) for family, cls in PROCESSORS.items()}


def build_image_processor(family: str, min_pixels: int = 32 * 32, max_pixels: int = 448 * 448):
    patch = 16 if family == "qwen3_vl" else 14
    stats = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    return T.Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **stats)


def build_processor(family: str, tokenizer, image_processor=None):
    image_processor = image_processor or build_image_processor(family)
    return IMAGE_ONLY[family](image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=tokenizer.chat_template)


def model_family(model_dir: str | Path) -> str:
    config = T.AutoConfig.from_pretrained(model_dir)
    if config.model_type not in PROCESSORS:
        raise UserError(f"{model_dir}: model type {config.model_type!r} is not supported "
                        f"(supported: {', '.join(PROCESSORS)})")
    return config.model_type


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory as given, or a hub id (`Qwen/Qwen2.5-VL-3B-Instruct`) resolved to its
    snapshot in the local Hugging Face cache (HF_HOME); nothing is ever downloaded."""
    if Path(path).is_dir() or not HUB_ID.fullmatch(str(path)):
        return Path(path)
    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):  # not cached; not a valid hub id
        raise UserError(f"{path}: no such directory, and no such model in the local Hugging Face "
                        f"cache ({constants.HF_HUB_CACHE}); fetch it with `hf download {path}`, "
                        "or point HF_HOME at the cache that holds it") from None


def load_vlm(model_dir: str | Path, dtype=None, attn_implementation: str | None = None):
    """(model, processor, family) from a saved HF directory, a cached hub id, or an adapter
    checkpoint (merged into its base here); fails clearly if it is incomplete.
    `attn_implementation`: "sdpa", "flash_attention_2" or "eager" (None: the HF default)."""
    from coordexp.model.tuning import ADAPTER_CONFIG, adapter_base, merge_adapter

    model_dir = resolve_model_dir(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        base, _, family = load_vlm(adapter_base(model_dir), dtype, attn_implementation)
        return merge_adapter(base, model_dir), load_processor(model_dir, family), family
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    family = model_family(model_dir)
    processor = load_processor(model_dir, family)
    try:
        model = T.AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError, SafetensorError) as e:  # truncated / missing safetensors
        raise UserError(f"{model_dir}: cannot load the model weights "
                        f"({' '.join(str(e).split())[:200]})") from None
    return model, processor, family


def load_processor(model_dir: Path, family: str):
    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    image_processor = T.Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    return build_processor(family, tokenizer, image_processor)


def save_vlm(model, processor, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
