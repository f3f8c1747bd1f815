"""Checkpoints: an HF model directory (safetensors) plus optimizer, scheduler, RNG and data-order
state; written to a temporary folder and renamed into place, so a kill mid-save leaves the
previous checkpoint usable. Everything but the weights loads with weights_only=True."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText

from coordexp.artifacts import checkpoint_dir, finish_checkpoint, prune_checkpoints
from coordexp.errors import UserError
from coordexp.files import load_json
from coordexp.model.qwen_vl import save_vlm

STATE_FILE = "trainer_state.json"
# trainer_state.json fields a resume reads, with the JSON types each may have
STATE_TYPES = {"step": (int,), "best_metric": (int, float, type(None)),
               "best_step": (int, type(None)), "train_seconds": (int, float), "data_order": (dict,)}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_pos": random.getstate()[2], "numpy_keys": torch.from_numpy(np_state[1].copy()),
            "numpy_pos": int(np_state[2])}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         0, 0.0))


def save_checkpoint(run_dir: Path, state, model, processor, optimizer, scheduler, order, *,
                    keep: int, main: bool) -> Path:
    final = checkpoint_dir(run_dir, state.step)
    if main:
        tmp = final.with_name(final.name + ".tmp")
        save_vlm(model, processor, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / "training_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state.__dict__,
                                                  "data_order": order.state_dict()}, indent=1))
        finish_checkpoint(tmp, final)
        best = {checkpoint_dir(run_dir, state.best_step)} if state.best_step else set()
        prune_checkpoints(run_dir, keep, best)
    if dist.is_initialized():
        dist.barrier()
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, order) -> dict:
    """Restore everything in place; returns the trainer-state fields."""
    files = [ckpt / "model.safetensors", ckpt / "training_state.pt", ckpt / STATE_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{ckpt}: incomplete checkpoint (missing {', '.join(missing)})")
    try:
        # from_pretrained maps the saved (HF checkpoint) key names back to the module's names
        saved = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())
        blob = torch.load(files[1], weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError,
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
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        order.load_state_dict(meta.pop("data_order"))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise UserError(f"{files[1]} / {STATE_FILE}: missing or mistyped state "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    return meta
