"""The one training loop, read top to bottom: every stage only provides its step function.

Runs on `accelerate.Accelerator` (device, mixed precision, process group). The step runs as the
forward of one module (`train/engine.StepModule`) wrapped by torch's DDP or FSDP2, so gradient
averaging (DDP) or reduce-scattering (FSDP) is the engine's, hooked into every step.
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
    load_config,
    packing_notes,
)
from coordexp.data.collate import Collator
from coordexp.data.records import read_records
from coordexp.diagnostics import finalize_stats
from coordexp.errors import UserError
from coordexp.files import check_output_dir
from coordexp.model.tuning import hf_model
from coordexp.predict import predict_records
from coordexp.train.checkpoint import load_checkpoint, save_checkpoint
from coordexp.train.data_order import DataOrder, build_data_order
from coordexp.train.engine import (
    StepModule,
    clip_gradients,
    enable_checkpointing,
    full_parameters,
    gradient_sync,
    inner,
    wrap,
)
from coordexp.train.setup import (
    build_model,
    build_optimizer,
    build_scheduler,
    build_step_fn,
    decay_progress,
    warmup_steps,
)
from coordexp.train.terms import add_stats, ignored_keys_notes


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
    # a rank whose step had no coord slot (or ran the other channel) lacks some keys: agree on
    # the union first (a small object gather), then one all-reduce of every pair at once
    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(stats))
    names = sorted(set().union(*keys))
    zero = torch.zeros(2, dtype=torch.float64)
    stacked = torch.stack([stats.get(k, zero).cpu() for k in names])  # [S, 2]
    dist.all_reduce(stacked)
    return dict(zip(names, stacked, strict=True))


def run_micro_steps(engine, order: DataOrder, records, gas: int, step: int, accelerator):
    """Forward/backward over one accumulation window; returns the summed statistics."""
    totals: dict[str, torch.Tensor] = {}
    for micro in range(gas):
        batch = [records[i] for i in order.next_indices()]
        # the engine reduces gradients across ranks in the window's last backward only
        with gradient_sync(engine, micro == gas - 1):
            with accelerator.autocast():
                loss, stats = engine(batch, step)
            # one host sync per micro-step: a non-finite loss must stop the run here, naming
            # its samples, before it reaches the weights
            if not torch.isfinite(loss.detach()):
                ids = ", ".join(r.image for r in batch)
                raise NonFiniteLoss(f"non-finite loss {loss.item()} at step {step} "
                                    f"(samples: {ids}); lower the learning rate or check the data")
            (loss / gas).backward()
        add_stats(totals, stats)
    return totals


def train(cfg: Config, *, resume: str = "") -> Path:
    """Train per the config; returns the run directory."""
    t = cfg.training
    # the process group (from torchrun's environment), the device and autocast; the engine
    # around the model is torch's own (train/engine.py)
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
    # the same seed on every rank: a tiny model's weights and fresh LoRA weights come out
    # identical everywhere without a broadcast (FSDP shards what each rank built)
    torch.manual_seed(t.seed)
    train_records = read_records(cfg.data.train)
    if not train_records:
        raise UserError(f"{cfg.data.train}: no records")
    val_records = read_records(cfg.data.val) if cfg.data.val else []
    if cfg.data.val and not val_records:
        raise UserError(f"{cfg.data.val}: no records, so evaluation would be off; give a "
                        "non-empty file or leave data.val empty")
    val_records = val_records[: cfg.data.val_limit or None]

    # model (a PeftModel under LoRA/DoRA) -> per-layer checkpointing -> the step as a module
    # forward -> DDP / FSDP; the optimizer comes last since FSDP replaces the parameters
    model, processor = build_model(cfg, run_dir, main)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.to(accelerator.device).train()
    collator = Collator(processor, CoordCodec(), cfg.data.field_order)
    collator.check_descs(train_records)
    step_fn = build_step_fn(cfg, hf_model(model), collator)
    engine = wrap(StepModule(model, step_fn), t.distributed, world, accelerator.device)
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
    evaluate = make_evaluator(cfg, engine, processor, val_records, run_dir, log, rank, world)

    bar = tqdm(total=t.max_steps, initial=state.step, desc="train", disable=not main)
    while state.step < t.max_steps:
        started = time.perf_counter()
        totals = run_micro_steps(engine, order, train_records, gas, state.step, accelerator)
        # the global norm needs every rank's gradient shard: one all-reduce under FSDP
        grad_norm = clip_gradients(engine, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.train_seconds += time.perf_counter() - started
        # statistics are (sum, count) pairs: summed over ranks before any ratio is formed
        metrics = finalize_stats(reduce_stats(totals, world))
        metrics |= {"grad_norm": grad_norm, "learning_rate": scheduler.get_last_lr()[0]}
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
            # every rank takes part: the full weights are gathered from the shards, then
            # written once by the main process
            save_checkpoint(run_dir, state, model, processor, optimizer, scheduler, order,
                            keep=t.save_total_limit, main=main)
        if last:
            note = _clock_stop_note(t, state.step)
            if note and main:
                print(note, file=sys.stderr)
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


def _clock_stop_note(t: TrainingConfig, step: int) -> str | None:
    """A run the clock stopped early in its schedule learned less than its config suggests:
    the schedule spans max_steps, not the minutes (plan max_steps to fit the minutes)."""
    if step >= t.max_steps:
        return None
    warmup = warmup_steps(t)
    if t.warmup_ratio > 0 and step < warmup:
        return (f"note: training.max_minutes stopped the run at step {step}, inside its "
                f"{warmup}-step warmup (warmup_ratio x max_steps {t.max_steps}): the learning "
                "rate never reached training.learning_rate; set max_steps to what fits")
    decayed = decay_progress(t, step)
    if t.min_lr_ratio < 1 and decayed < 0.9:
        return (f"note: training.max_minutes stopped the run at step {step} of max_steps "
                f"{t.max_steps}, {decayed:.0%} of the way through its learning-rate decay")
    return None


def _agree(flag: bool, world: int) -> bool:
    """Every rank stops together: the time budget is checked on rank 0's clock (one
    broadcast per step; ranks' clocks differ, and a rank that stopped alone would hang the
    others' next collective)."""
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


def make_evaluator(cfg, engine, processor, val_records, run_dir, log, rank: int, world: int):
    """evaluate(step) -> metrics on every rank; the main process logs them and the dump."""

    def evaluate(step: int) -> dict | None:
        metrics, samples = evaluate_distributed(engine, processor, val_records, cfg, rank, world)
        if rank == 0:
            log.log(step, "eval", metrics)
            if cfg.monitor_dump.enabled:
                write_monitor_dump(run_dir, step, metrics, samples, cfg.monitor_dump.max_samples)
        if world > 1:  # every rank tracks the best checkpoint from the same numbers
            box = [metrics]
            dist.broadcast_object_list(box, 0)
            metrics = box[0]
        return metrics

    return evaluate


def evaluate_distributed(engine, processor, val_records, cfg, rank: int, world: int):
    """Every rank rolls out its share of the validation records; the main process scores the
    gathered predictions, in record order, exactly as one process would: (metrics, samples)
    there, (None, None) elsewhere."""
    from coordexp.train.evaluation import score_predictions

    mine = shard_records(val_records, cfg.rollout.batch_size, rank, world)
    # rollouts run a data-dependent number of forwards per rank: under FSDP the weights are
    # gathered once for all of them (no collective inside generation)
    with full_parameters(engine), torch.no_grad():
        preds = predict_records(hf_model(inner(engine).model), processor,
                                [val_records[i] for i in mine], cfg, progress=rank == 0)
    # one object gather puts every rank's predictions back in record order
    preds = gather_in_order(preds, mine, len(val_records), world)
    return score_predictions(val_records, preds, cfg) if rank == 0 else (None, None)


def shard_records(records: list, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of this rank's share: whole rollout batches, round robin. Each batch holds the
    same records as in a one-process eval, so each rollout (padding included) is identical."""
    return [i for i in range(len(records)) if (i // batch_size) % world == rank]


def gather_in_order(preds: list, mine: list[int], total: int, world: int) -> list:
    """Every rank's predictions back in record order (one all_gather_object)."""
    if world == 1:
        return preds
    parts: list = [None] * world
    dist.all_gather_object(parts, list(zip(mine, preds, strict=True)))
    ordered = dict(pair for part in parts for pair in part)
    return [ordered[i] for i in range(total)]


def train_command(config_path: str, overrides: list[str], resume: str = "") -> int:
    cfg = load_config(config_path, overrides)
    try:
        run_dir = train(cfg, resume=resume)
    except NonFiniteLoss as e:
        raise UserError(str(e)) from None
    print(f"run directory: {run_dir}")
    return 0
