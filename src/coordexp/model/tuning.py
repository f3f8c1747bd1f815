"""Parameter-efficient tuning with PEFT: LoRA / DoRA on the linear layers of the chosen parts
(LLM, ViT, aligner), the 1000 coord-token rows trainable through PEFT's trainable tokens, and
adapter checkpoints: saving, loading (merged into their base) and merging to a plain model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from coordexp.config import ModelConfig
from coordexp.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
PARTS = ("llm", "vit", "aligner")


def model_part(name: str) -> str | None:
    """llm | vit | aligner for a module name of a Qwen-VL model; None for the LM head."""
    if name.startswith("lm_head"):
        return None
    if ".visual." in f".{name}":
        return "aligner" if "merger" in name else "vit"
    return "llm"


def lora_targets(model: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
    """Full names of every nn.Linear in the given parts (the LM head is never a target)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and model_part(name) in parts]


def apply_tuning(model, m: ModelConfig, coord_ids: list[int], base_path: str | Path):
    """`model` itself for full tuning; else a PeftModel whose only trainable parameters are the
    LoRA/DoRA weights and the coord rows of the embedding (and of an untied LM head).
    `base_path`: the directory the adapter applies to, written into its checkpoints."""
    if m.tuning == "full":
        return model
    tied = model.config.get_text_config().tie_word_embeddings
    # a tied head shares the embedding's rows (PEFT ties the two token adapters); an untied
    # head gets its own trainable coord rows
    tokens = coord_ids if tied else {"embed_tokens": coord_ids, "lm_head": coord_ids}
    config = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                        target_modules=lora_targets(model, m.lora.targets),
                        use_dora=m.tuning == "dora", trainable_token_indices=tokens)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return peft_model


def is_adapter(model) -> bool:
    return isinstance(model, PeftModel)


def hf_model(model):
    """The transformers model the trainers call (adapter layers are injected in place)."""
    return model.get_base_model() if is_adapter(model) else model


def save_adapter(model: PeftModel, out_dir: Path, state_dict: dict | None = None) -> None:
    """Only what trains: the adapter weights and the coord rows (adapter_model.safetensors)."""
    model.save_pretrained(out_dir, state_dict=state_dict, save_embedding_layers=False)


def adapter_base(adapter_dir: Path) -> Path:
    """The model directory an adapter checkpoint applies to (itself possibly an adapter)."""
    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: not a PEFT adapter config") from None
    if not base or not Path(base).is_dir():
        raise UserError(f"{adapter_dir}: its base model {base!r} (adapter_config.json "
                        "base_model_name_or_path) is not a directory here")
    return Path(base)


def merge_adapter(base_model, adapter_dir: Path):
    """Load the adapter onto its base and fold it in: LoRA/DoRA into the linear layers, the
    coord rows into the embedding and the head. Returns a plain transformers model."""
    return PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()


def load_adapter_weights(model: PeftModel, adapter_dir: Path) -> None:
    """Restore a run's own adapter checkpoint into its live PeftModel (exact resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(adapter_dir / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys, result.unexpected_keys
