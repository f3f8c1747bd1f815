"""Checkpoints: an HF model directory (safetensors), or under LoRA/DoRA an adapter directory
holding only what trains, plus optimizer, scheduler, per-rank RNG and data-order state.

Weights and optimizer state are gathered into full (unsharded) state dicts, the same under one
process, DDP and FSDP, and written once by the main process to a temporary folder that is then
renamed into place, so a kill mid-save leaves the previous checkpoint usable. Resume loads the
full state dicts on every rank and lets torch re-shard them. Everything but the weights loads
with weights_only=True.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from transformers import AutoModelForImageTextToText

from coordexp.artifacts import checkpoint_dir, finish_checkpoint, prune_checkpoints
from coordexp.errors import UserError
from coordexp.files import load_json
from coordexp.model.tuning import ADAPTER_CONFIG, hf_model, is_adapter, save_adapter

STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
# full tensors, moved to the CPU of rank 0 only (the others get empty dicts)
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# trainer_state.json fields a resume reads, with the JSON types each may have
STATE_TYPES = {"step": (int,), "best_metric": (int, float, type(None)),
               "best_step": (int, type(None)), "train_seconds": (int, float), "data_order": (dict,)}


def rng_state() -> dict:
    """Plain Python values (they travel through all_gather_object and weights_only loads)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1]),
            "python_pos": random.getstate()[2], "numpy_keys": np_state[1].tolist(),
            "numpy_pos": int(np_state[2])}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", np.array(s["numpy_keys"], dtype=np.uint32), s["numpy_pos"],
                         0, 0.0))


def all_rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order (a collective when distributed)."""
    if not dist.is_initialized():
        return [rng_state()]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(run_dir: Path, state, model, processor, optimizer, scheduler, order, *,
                    keep: int, main: bool) -> Path:
    """Every rank calls this (the state dicts are gathered collectively); the main one writes."""
    final = checkpoint_dir(run_dir, state.step)
    weights, optim = get_state_dict(model, optimizer, options=GATHER)
    rngs = all_rng_states()
    if main:
        tmp = final.with_name(final.name + ".tmp")
        write_weights(model, weights, tmp)
        processor.save_pretrained(tmp)
        # an adapter run keeps its trainable tensors under their live names for exact resume
        trainable = {k: weights[k] for k, p in model.named_parameters() if p.requires_grad} \
            if is_adapter(model) else None
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs,
                    "trainable": trainable}, tmp / TRAINING_STATE)
        (tmp / STATE_FILE).write_text(json.dumps({**state.__dict__,
                                                  "data_order": order.state_dict()}, indent=1))
        finish_checkpoint(tmp, final)
        best = {checkpoint_dir(run_dir, state.best_step)} if state.best_step else set()
        prune_checkpoints(run_dir, keep, best)
    if dist.is_initialized():
        dist.barrier()
    return final


def write_weights(model, weights: dict, out_dir: Path) -> None:
    """An adapter directory (LoRA/DoRA + coord rows) or a full HF model directory."""
    if is_adapter(model):
        save_adapter(model, out_dir, weights)
    else:
        tied = tied_duplicates(model)
        hf_model(model).save_pretrained(
            out_dir, state_dict={k: v for k, v in weights.items() if k not in tied})


def tied_duplicates(model) -> set[str]:
    """Names of parameters that are another name's tensor (a tied head). Gathered state dicts
    hold separate copies, which transformers would then write twice."""
    first: dict[int, str] = {}
    return {name for name, p in model.named_parameters(remove_duplicate=False)
            if first.setdefault(id(p), name) != name}


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, order) -> dict:
    """Restore everything in place on every rank; returns the trainer-state fields."""
    weights_file = ckpt / (ADAPTER_CONFIG if is_adapter(model) else "model.safetensors")
    files = [weights_file, ckpt / TRAINING_STATE, ckpt / STATE_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{ckpt}: incomplete checkpoint (missing {', '.join(missing)}); an "
                        "adapter run resumes from its own checkpoints only")
    try:
        blob = torch.load(files[1], weights_only=True)
        if is_adapter(model):
            weights = blob["trainable"]
        else:  # from_pretrained maps the saved (HF checkpoint) key names to the module's
            weights = AutoModelForImageTextToText.from_pretrained(
                ckpt, dtype=hf_model(model).dtype).state_dict()
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError, KeyError,
            pickle.UnpicklingError) as e:
        raise UserError(f"{ckpt}: cannot read checkpoint ({' '.join(str(e).split())[:200]}); "
                        "it may be truncated") from None
    meta = load_json(files[2])
    bad = [k for k, types in STATE_TYPES.items()
           if not isinstance(meta, dict) or type(meta.get(k, ...)) not in types]
    if not bad and not all(type(meta["data_order"].get(k)) is int for k in ("epoch", "pos")):
        bad = ["data_order.epoch/pos"]
    if bad:
        raise UserError(f"{files[2]}: missing or mistyped key(s) {', '.join(bad)}")
    try:
        set_state_dict(model, optimizer, model_state_dict=weights,
                       optim_state_dict=blob["optimizer"],
                       options=StateDictOptions(full_state_dict=True,
                                                strict=not is_adapter(model)))
        scheduler.load_state_dict(blob["scheduler"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        set_rng_state(blob["rng"][min(rank, len(blob["rng"]) - 1)])
        order.load_state_dict(meta.pop("data_order"))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise UserError(f"{files[1]} / {STATE_FILE}: missing or mistyped state "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    return meta
