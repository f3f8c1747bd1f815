"""The one training loop, read top to bottom: every stage only provides its step function.

Runs on `accelerate.Accelerator` (device, mixed precision, process group). The model is not
wrapped in DDP: step functions call submodules directly (the fast Channel A needs that), so the
loop averages gradients across ranks itself, once per optimizer step.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from tqdm import tqdm

from coordexp.artifacts import (
    RunLog,
    latest_checkpoint,
    lock_run_dir,
    write_metadata,
    write_monitor_dump,
)
from coordexp.codec import CoordCodec
from coordexp.config import (
    Config,
    TrainingConfig,
    check_config,
    ignored_keys_notes,
    load_config,
    packing_notes,
)
from coordexp.data.collate import Collator
from coordexp.data.records import read_records
from coordexp.diagnostics import finalize_stats
from coordexp.errors import UserError
from coordexp.files import check_output_dir
from coordexp.train.checkpoint import load_checkpoint, save_checkpoint
from coordexp.train.data_order import DataOrder, build_data_order
from coordexp.train.setup import build_model, build_optimizer, build_scheduler, build_step_fn
from coordexp.train.terms import add_stats


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0


def reduce_stats(stats: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Sum (sum, count) pairs over ranks; key sets may differ, so they are unioned first."""
    if world == 1:
        return stats
    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(stats))
    names = sorted(set().union(*keys))
    zero = torch.zeros(2, dtype=torch.float64)
    stacked = torch.stack([stats.get(k, zero).cpu() for k in names])  # [S, 2]
    dist.all_reduce(stacked)
    return dict(zip(names, stacked, strict=True))


def average_gradients(model: torch.nn.Module, world: int) -> None:
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def run_micro_steps(step_fn, order: DataOrder, records, gas: int, step: int, accelerator):
    """Forward/backward over one accumulation window; returns the summed statistics."""
    totals: dict[str, torch.Tensor] = {}
    for _ in range(gas):
        batch = [records[i] for i in order.next_indices()]
        with accelerator.autocast():
            out = step_fn(batch, step)
        if not torch.isfinite(out.loss.detach()):
            ids = ", ".join(r.image for r in batch)
            raise NonFiniteLoss(f"non-finite loss {out.loss.item()} at step {step} "
                                f"(samples: {ids}); lower the learning rate or check the data")
        (out.loss / gas).backward()
        add_stats(totals, out.stats)
    return totals


def train(cfg: Config, *, resume: str = "") -> Path:
    """Train per the config; returns the run directory."""
    t = cfg.training
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, \
        accelerator.is_main_process
    check_config(cfg, world)
    if main:
        for note in ignored_keys_notes(cfg) + packing_notes(cfg):
            print(note, file=sys.stderr)
    run_dir = Path(t.output_dir) / t.run_name
    if main:
        check_output_dir(run_dir, "training.output_dir/run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir) if main else None  # held until this training ends
    if main and (run_dir / "logging.jsonl").exists() and not resume:
        raise UserError(f"{run_dir} already holds a run; pass --resume latest or choose another "
                        "training.run_name")
    torch.manual_seed(t.seed)
    train_records = read_records(cfg.data.train)
    if not train_records:
        raise UserError(f"{cfg.data.train}: no records")
    val_records = read_records(cfg.data.val) if cfg.data.val else []
    if cfg.data.val and not val_records:
        raise UserError(f"{cfg.data.val}: no records, so evaluation would be off; give a "
                        "non-empty file or leave data.val empty")
    val_records = val_records[: cfg.data.val_limit or None]

    model, processor = build_model(cfg, run_dir, main)
    model.to(accelerator.device).train()
    collator = Collator(processor, CoordCodec(), cfg.data.field_order)
    collator.check_descs(train_records)
    step_fn = build_step_fn(cfg, model, collator)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    gas = cfg.gradient_accumulation_steps(world)
    order = build_data_order(t, train_records, collator, rank, world)
    state = TrainState()
    ckpt = (latest_checkpoint(run_dir) if resume == "latest" else Path(resume)) if resume else None
    if resume and ckpt is None and main:
        print(f"note: {run_dir} has no checkpoint yet; starting the run afresh", file=sys.stderr)
    if ckpt is not None:
        state.__dict__.update(load_checkpoint(ckpt, model, optimizer, scheduler, order))
    if main:
        write_metadata(run_dir, cfg, world)
    log = RunLog(run_dir, main, resume_step=state.step if resume else None,
                 report_to=t.report_to)
    evaluate = make_evaluator(cfg, model, processor, val_records, run_dir, log, main)

    bar = tqdm(total=t.max_steps, initial=state.step, desc="train", disable=not main)
    while state.step < t.max_steps:
        started = time.perf_counter()
        totals = run_micro_steps(step_fn, order, train_records, gas, state.step, accelerator)
        average_gradients(model, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.train_seconds += time.perf_counter() - started
        metrics = finalize_stats(reduce_stats(totals, world))
        metrics |= {"grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0]}
        out_of_time = t.max_minutes > 0 and state.train_seconds > 60 * t.max_minutes
        last = state.step == t.max_steps or _agree(out_of_time, world)
        if state.step % t.logging_steps == 0 or last:
            log.log(state.step, "train", metrics)
        bar.total = _expected_last_step(t, state)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if val_records and (state.step % t.eval_steps == 0 or (last and t.eval_at_end)):
            track_best(state, evaluate(state.step), t.metric_for_best)
        if state.step % t.save_steps == 0 or last:
            save_checkpoint(run_dir, state, model, processor, optimizer, scheduler, order,
                            keep=t.save_total_limit, main=main)
        if last:
            break
    bar.close()
    log.close()
    accelerator.wait_for_everyone()
    if lock is not None:
        lock.close()
    return run_dir


def _expected_last_step(t: TrainingConfig, state: TrainState) -> int:
    """max_steps, or sooner the step at which training.max_minutes runs out at the mean pace
    so far: the progress bar's total and time left then mean something."""
    if t.max_minutes <= 0:
        return t.max_steps
    per_step = state.train_seconds / state.step
    left = max(0.0, 60 * t.max_minutes - state.train_seconds)
    return min(t.max_steps, state.step + math.ceil(left / per_step))


def _agree(flag: bool, world: int) -> bool:
    """Every rank stops together: the time budget is checked on rank 0's clock."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def track_best(state: TrainState, metrics: dict | None, key: str) -> None:
    if metrics is None or key not in metrics or not math.isfinite(metrics[key]):
        return
    if state.best_metric is None or metrics[key] > state.best_metric:
        state.best_metric, state.best_step = metrics[key], state.step


def make_evaluator(cfg, model, processor, val_records, run_dir, log, main):
    """Eval runs rollouts on the main process; other ranks wait for it."""

    def evaluate(step: int) -> dict | None:
        metrics = None
        if main:
            from coordexp.train.evaluation import evaluate_model

            metrics, samples = evaluate_model(model, processor, val_records, cfg)
            log.log(step, "eval", metrics)
            if cfg.monitor_dump.enabled:
                write_monitor_dump(run_dir, step, metrics, samples, cfg.monitor_dump.max_samples)
        if dist.is_initialized():
            box = [metrics]
            dist.broadcast_object_list(box, 0)
            metrics = box[0]
        return metrics

    return evaluate


def train_command(config_path: str, overrides: list[str], resume: str = "") -> int:
    cfg = load_config(config_path, overrides)
    try:
        run_dir = train(cfg, resume=resume)
    except NonFiniteLoss as e:
        raise UserError(str(e)) from None
    print(f"run directory: {run_dir}")
    return 0
