"""The distributed engine: the stage's step run as one module's forward, wrapped by torch's own
DDP or FSDP2 (`fully_shard`), activation checkpointing per layer, and the helpers the loop needs
around them (gradient sync per micro-step, full parameters for rollouts, full state dicts)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from coordexp.model.tuning import hf_model


class StepModule(nn.Module):
    """The stage's step as a module forward. DDP and FSDP act through module forwards (FSDP
    gathers the root's parameters in its pre-forward hook, DDP prepares its gradient hooks);
    a step that reads the LM-head weight or calls the vision tower outside one would escape
    them, so every step runs inside this forward."""

    def __init__(self, model: nn.Module, step_fn):
        super().__init__()
        self.model = model  # the trained module (a PeftModel under LoRA/DoRA)
        self.step_fn = step_fn

    def forward(self, records, step: int):
        out = self.step_fn(records, step)
        return out.loss, out.stats


def layer_units(model: nn.Module) -> list[nn.Module]:
    """Decoder layers and vision blocks: the classes the model itself names as never split."""
    names = set(hf_model(model)._no_split_modules)
    return [m for m in model.modules() if type(m).__name__ in names]


def enable_checkpointing(model: nn.Module) -> None:
    """Per-layer activation checkpointing (non-reentrant): each decoder layer and vision block
    keeps only its inputs for backward and reruns there. Torch's composable `checkpoint`, not
    the transformers switch: that one drops the KV cache the fast Channel A shares."""
    for unit in layer_units(model):
        checkpoint(unit)


def wrap(step_module: StepModule, kind: str, world: int, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around the step module (one process: the module itself)."""
    if world == 1:
        return step_module
    if kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # buffers (rotary tables) are constants: no broadcast before every forward
        return DistributedDataParallel(step_module, device_ids=ids, broadcast_buffers=False)
    # bf16 compute with fp32 gradient reduction on GPU; float32 throughout on CPU
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for unit in layer_units(step_module.model):
        fully_shard(unit, mp_policy=mp)
    fully_shard(step_module, mp_policy=mp)  # the root: embeddings, head, norms, ViT stem
    return step_module


def gradient_sync(engine: nn.Module, sync: bool):
    """Context for one micro-step's backward: reduce gradients only on the window's last."""
    if isinstance(engine, DistributedDataParallel):
        return nullcontext() if sync else engine.no_sync()
    if isinstance(engine, FSDPModule):
        engine.set_requires_gradient_sync(sync)
    return nullcontext()


def inner(engine: nn.Module) -> StepModule:
    return engine.module if isinstance(engine, DistributedDataParallel) else engine


def clip_gradients(engine: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over every shard under FSDP); returns the norm.

    The norm is summed in float64: a float32 norm over millions of entries is off by ~1e-5
    relative, and by a different amount when summed shard by shard, which scales every
    gradient of a sharded run differently from the one-process run's."""
    params = [p for p in engine.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in params]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    # the clip factor in float32, the gradients' dtype: the float64 sum is what makes runs agree
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.float())
    return float(norm)


@contextmanager
def full_parameters(engine: nn.Module):
    """Unsharded parameters on every rank for rollouts. Generation runs a data-dependent number
    of forwards per rank, so no forward may all-gather: gather every unit once here (the same
    collectives in the same order on every rank), keep them through the rollouts, reshard."""
    if not isinstance(engine, FSDPModule):
        yield
        return
    units = [m for m in engine.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            if unit is not engine:  # the root keeps its parameters through forward as before
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()
