"""Every config section as a frozen dataclass, and the one strict loader.

YAML files may `extends:` others (paths relative to the file; later wins, deep merge);
`key.sub=value` overrides come from the command line. Unknown keys, wrong types and
impossible combinations raise UserError naming the dotted key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from coordexp.errors import UserError
from coordexp.files import read_text
from coordexp.matching import MatchConfig


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = ("llm", "vit", "aligner")  # all linear layers of these parts


@dataclass(frozen=True)
class ModelConfig:
    # an HF model directory with the coord tokens, a hub id in the HF cache, or an adapter
    # checkpoint (merged into its base on load)
    path: str = ""
    init_tiny: str = ""  # or build a tiny random model of this family into the run directory
    coord_embed_init: str = "mean"  # mean | ordinal: start coord-token embeddings on a 1-D curve
    tuning: str = "full"  # full | lora | dora (the 1000 coord rows always train)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class DataConfig:
    train: str = ""
    val: str = ""
    field_order: str = "desc_first"
    val_limit: int = 0  # 0 = every val record


@dataclass(frozen=True)
class TrainingConfig:
    stage: str = "stage1"  # stage1 | stage2_ab
    output_dir: str = "runs"
    run_name: str = "run"
    seed: int = 17
    max_steps: int = 100  # optimizer steps
    # stop (and evaluate) after this much training time; 0 = off. The learning-rate schedule
    # still spans max_steps: a stop inside the warmup or early in the decay prints a note
    max_minutes: float = 0.0
    effective_batch_size: int = 8  # samples per optimizer step, over all ranks
    per_device_batch_size: int = 8
    learning_rate: float = 1e-3
    vit_lr: float = 1e-3
    aligner_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    logging_steps: int = 1
    eval_steps: int = 50
    save_steps: int = 50
    save_total_limit: int = 2
    metric_for_best: str = "rollout/mAP"
    eval_at_end: bool = True
    # padding-free packing: none | static (a pack plan fixed once from the encoded lengths);
    # with static, a micro-step is one packed row of up to packing_length tokens
    packing: str = "none"
    packing_length: int = 4096
    packing_allow_single_long: bool = False  # a sample longer than a row runs alone
    report_to: tuple[str, ...] = ("tensorboard",)  # tensorboard, wandb; logging.jsonl always
    gradient_checkpointing: bool = False  # LLM layers and ViT blocks keep only their inputs
    distributed: str = "ddp"  # ddp | fsdp (decoder layers and vision blocks as shard units)


@dataclass(frozen=True)
class CoordSoftCEW1Config:
    enabled: bool = True
    ce_weight: float = 0.0  # hard CE over the bins (Stage 1)
    soft_ce_weight: float = 1.0
    w1_weight: float = 1.0
    gate_weight: float = 1.0  # Stage 1; Stage 2 reads stage2_ab.coord_gate_weight
    temperature: float = 1.0
    target_sigma: float = 2.0  # in bins
    target_truncate: int | None = None
    bbox_smoothl1_weight: float = 0.0  # Stage-1 geometry on the expectation decode
    bbox_ciou_weight: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    b_ratio: float = 0.0


@dataclass(frozen=True)
class ChannelBConfig:
    drop_invalid_struct_ce_multiplier: float = 1.0


@dataclass(frozen=True)
class Stage2ABConfig:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    n_softctx_iter: int = 2
    softctx_grad_mode: str = "unroll"  # unroll | em_detach
    softctx_temperature: float = 1.0
    coord_ctx_embed_mode: str = "st"  # st | soft | hard
    coord_decode_mode: str = "exp"  # exp | st
    channel_a_impl: str = "fast"  # fast | reference (full recompute, for tests and benchmarks)
    # fast path: recompute the non-final passes' suffix activations in backward instead of
    # keeping them (one more suffix forward per such pass for about one pass less memory)
    softctx_recompute: bool = True
    desc_ce_weight: float = 1.0
    fmt_struct_ce_weight: float = 0.1
    bbox_smoothl1_weight: float = 1.0
    bbox_ciou_weight: float = 1.0
    coord_ce_weight: float = 0.0
    coord_gate_weight: float = 0.0
    text_gate_weight: float = 0.0
    # Channel B clean prefix: an unmatched prediction with a matched prediction's desc and
    # IoU >= duplicate_iou with it, emitted after it, leaves the teacher-forced prefix and its
    # first diverging token gets -log(1 - p); 0 = off (the prefix is kept as generated).
    # duplicate_ul_span "box": where that token is a coord, p is the mass of every bin that
    # keeps the box a near-duplicate along that coordinate, not of the one bin
    duplicate_iou: float = 0.9
    duplicate_ul_weight: float = 0.0
    duplicate_ul_span: str = "token"
    duplicate_of: str = "matched"  # "any": a repeat of an unmatched prediction counts too
    channel_b: ChannelBConfig = field(default_factory=ChannelBConfig)


@dataclass(frozen=True)
class RolloutConfig:
    batch_size: int = 16
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # HF RepetitionPenaltyLogitsProcessor: every token id already in the sequence (the prompt,
    # JSON punctuation and coord tokens included) has its logit divided (if > 0) or multiplied
    # (if < 0) by this; 1.0 = off. It cannot tell a repeated object from a repeated `", "`.
    repetition_penalty: float = 1.0
    constrained: bool = False  # CoordJSON grammar: coord slots emit only coord tokens


@dataclass(frozen=True)
class EvalConfig:
    score: str = "coord_prob"  # coord_prob | fused | constant
    semantic_desc: bool = False  # map unknown descs by a sentence encoder (optional extra)


@dataclass(frozen=True)
class MonitorDumpConfig:
    enabled: bool = True
    max_samples: int = 6


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    coord_soft_ce_w1: CoordSoftCEW1Config = field(default_factory=CoordSoftCEW1Config)
    stage2_ab: Stage2ABConfig = field(default_factory=Stage2ABConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor_dump: MonitorDumpConfig = field(default_factory=MonitorDumpConfig)

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step so one step sees exactly effective_batch_size samples."""
        t = self.training
        return t.effective_batch_size // (t.per_device_batch_size * world_size)


REPORTERS = ("tensorboard", "wandb")  # training.report_to
CHOICES = {
    "training.stage": ("stage1", "stage2_ab"),
    "training.mixed_precision": ("no", "bf16", "fp16"),
    "training.packing": ("none", "static"),
    "data.field_order": ("desc_first", "geometry_first"),
    "model.coord_embed_init": ("mean", "ordinal"),
    "model.tuning": ("full", "lora", "dora"),
    "training.distributed": ("ddp", "fsdp"),
    "stage2_ab.softctx_grad_mode": ("unroll", "em_detach"),
    "stage2_ab.coord_ctx_embed_mode": ("st", "soft", "hard"),
    "stage2_ab.coord_decode_mode": ("exp", "st"),
    "stage2_ab.channel_a_impl": ("fast", "reference"),
    "eval.score": ("coord_prob", "fused", "constant"),
}
MOVED = {f"rollout.{k.name}": f"match.{k.name}" for k in dataclasses.fields(MatchConfig)}
REMOVED = {"model.max_pixels": "it was never read; the image processor saved with the model "
                                "sets the pixel budget"}
# metrics training.metric_for_best may name: rollout metrics where higher is better
BEST_METRICS = tuple(f"rollout/{k}" for k in (
    "mAP", "AP50", "AP75", "f1", "precision", "recall", "f1@0.5", "f1@0.75",
    "matched_maskiou_mean", "sample_valid_pred_rate"))
MAX_YAML_NODES = 100_000  # a config expands to a few hundred; aliases may not multiply it


# -- building dataclasses from dicts ---------------------------------------------------------
def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if origin is tuple:  # tuple[X, ...], written as a YAML list
        if not isinstance(value, list | tuple):
            raise UserError(f"config key '{key}' must be a list, e.g. [a, b]; got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]")
                     for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        value = {} if value is None else value  # an empty YAML section
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
            return value
    elif tp is float:
        number = _float(value)
        if number is not None and math.isfinite(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    raise UserError(f"config key '{key}' must be {'a finite ' if tp is float else ''}"
                    f"{tp.__name__}, got {text}")


def _float(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:  # YAML reads 1e-5 (no dot) as a string
        return float(value)
    except (ValueError, OverflowError):
        return None


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in REMOVED:
            raise UserError(f"config key '{dotted}' was removed: {REMOVED[dotted]}")
        if dotted in MOVED:
            raise UserError(f"config key '{dotted}' moved to '{MOVED[dotted]}' (one matching "
                            "config for Channel B and evaluation)")
        if key not in names:
            raise UserError(f"unknown config key '{dotted}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
        if dotted in CHOICES and kwargs[key] not in CHOICES[dotted]:
            raise UserError(f"config key '{dotted}' must be one of {CHOICES[dotted]}, "
                            f"got {kwargs[key]!r}")
    return cls(**kwargs)


# -- files and overrides ---------------------------------------------------------------------
def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    """Deep merge; a section and a plain value never replace each other (that would drop the
    section's keys or turn a value into defaults)."""
    out = dict(base)
    for k, v in over.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and out.get(k) is None or v is None and isinstance(out.get(k), dict):
            v, out[k] = v or {}, out.get(k) or {}  # an empty YAML section reads as null
        if k in out and isinstance(v, dict) != isinstance(out[k], dict):
            section = v if isinstance(v, dict) else out[k]
            value = out[k] if isinstance(v, dict) else v
            raise UserError(f"config key '{dotted}' is a section ({', '.join(map(str, section))})"
                            f" in one place and the value {value!r} in another; set its keys "
                            f"as {dotted}.key=value")
        out[k] = _merge(out[k], v, dotted) if isinstance(v, dict) and k in out else v
    return out


def safe_yaml(text: str, where: str) -> object:
    """yaml.safe_load with every failure (syntax, alias expansion beyond MAX_YAML_NODES, an
    integer too long, nesting) as one UserError naming where."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UserError(f"{where}: YAML aliases expand to more than {MAX_YAML_NODES} "
                            "values; write the config out plainly")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        raise UserError(f"{where}: not valid YAML ({e})") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict) -> int:
    """How many nodes (and characters of strings) the document expands to, aliases counted
    each time they are used; memoised per node, so a cycle or a bomb is counted, not built."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_YAML_NODES + 1  # a node reaching itself (a recursive alias) is too big
    if isinstance(node, yaml.ScalarNode):
        size = 1 + len(node.value) // 64
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, sizes) for n in node.value)
    else:
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = min(size, MAX_YAML_NODES + 1)
    return sizes[id(node)]


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: `extends` cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    data = safe_yaml(read_text(path), str(path)) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping at the top level")
    bases = data.pop("extends", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not (isinstance(bases, list) and all(isinstance(b, str) and b for b in bases)):
        raise UserError(f"{path}: 'extends' must be a file path or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, read_yaml(path.parent / base, (*seen, path)))
    return _merge(merged, data)


def parse_override(text: str) -> dict:
    """'training.learning_rate=3e-4' -> {"training": {"learning_rate": 0.0003}}."""
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if "=" not in text or not all(parts):
        raise UserError(f"override {text!r} must look like key.sub=value")
    value = safe_yaml(raw, f"override {key.strip()!r}") if raw else ""
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                base: dict | None = None) -> Config:
    data = dict(base or {})
    if path is not None:
        data = _merge(data, read_yaml(Path(path)))
    for text in overrides:
        data = _merge(data, parse_override(text))
    cfg = _build(Config, data)
    check_config(cfg)
    return cfg


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks; each message names the key and the fix."""
    t, s = cfg.training, cfg.stage2_ab
    if bool(cfg.model.path) == bool(cfg.model.init_tiny):
        raise UserError("set exactly one of 'model.path' (a model directory) or "
                        "'model.init_tiny' (qwen2_5_vl | qwen3_vl)")
    if not cfg.data.train:
        raise UserError("config key 'data.train' is required: a records JSONL file")
    if t.per_device_batch_size < 1 or t.effective_batch_size % (t.per_device_batch_size *
                                                                world_size):
        raise UserError(f"'training.effective_batch_size' ({t.effective_batch_size}) must be a "
                        f"multiple of per_device_batch_size x processes "
                        f"({t.per_device_batch_size} x {world_size})")
    positive = {"training.max_steps": t.max_steps, "training.eval_steps": t.eval_steps,
                "training.save_steps": t.save_steps, "training.logging_steps": t.logging_steps,
                "stage2_ab.n_softctx_iter": s.n_softctx_iter,
                "rollout.max_new_tokens": cfg.rollout.max_new_tokens}
    for key, v in positive.items():
        if v < 1:
            raise UserError(f"'{key}' must be >= 1, got {v}")
    lora = cfg.model.lora
    if lora.r < 1 or lora.alpha < 1 or not 0.0 <= lora.dropout < 1.0:
        raise UserError("'model.lora.r' and 'model.lora.alpha' must be >= 1 and "
                        "'model.lora.dropout' in [0, 1)")
    if not lora.targets or set(lora.targets) - {"llm", "vit", "aligner"}:
        raise UserError(f"'model.lora.targets' must be a non-empty list of llm, vit, aligner; "
                        f"got {list(lora.targets)}")
    if not 0.0 <= s.schedule.b_ratio <= 1.0:
        raise UserError(f"'stage2_ab.schedule.b_ratio' must be in [0, 1], got {s.schedule.b_ratio}")
    if not 1.0 <= s.channel_b.drop_invalid_struct_ce_multiplier <= 4.0:
        raise UserError("'stage2_ab.channel_b.drop_invalid_struct_ce_multiplier' must be in [1, 4]")
    if not 0.0 < s.duplicate_iou <= 1.0 or s.duplicate_ul_weight < 0:
        raise UserError("'stage2_ab.duplicate_iou' must be in (0, 1] and "
                        "'stage2_ab.duplicate_ul_weight' >= 0")
    if s.duplicate_of not in ("matched", "any"):
        raise UserError(f"'stage2_ab.duplicate_of' must be 'matched' or 'any', got "
                        f"{s.duplicate_of!r}")
    if s.duplicate_ul_span not in ("token", "box"):
        raise UserError(f"'stage2_ab.duplicate_ul_span' must be 'token' or 'box', got "
                        f"{s.duplicate_ul_span!r}")
    if not set(t.report_to) <= set(REPORTERS) or len(set(t.report_to)) < len(t.report_to):
        raise UserError(f"'training.report_to' lists each of {', '.join(REPORTERS)} at most "
                        f"once, got {list(t.report_to)}")
    c = cfg.coord_soft_ce_w1
    if c.temperature <= 0 or c.target_sigma <= 0 or s.softctx_temperature <= 0:
        raise UserError("temperatures and 'coord_soft_ce_w1.target_sigma' must be > 0")
    if c.target_truncate is not None and c.target_truncate < 0:
        raise UserError("'coord_soft_ce_w1.target_truncate' must be >= 0 or null")
    if t.packing == "static" and (t.per_device_batch_size != 1 or t.packing_length < 1):
        raise UserError("with training.packing=static a micro-step is one packed row: set "
                        "training.per_device_batch_size=1 (effective_batch_size counts rows) "
                        "and training.packing_length >= 1")
    if t.stage == "stage2_ab" and s.schedule.b_ratio > 0 and t.mixed_precision == "fp16":
        raise UserError("Channel B with fp16 is not supported; use "
                        "training.mixed_precision=bf16 or no")
    check_ranges(cfg)


def check_ranges(cfg: Config) -> None:
    """Every number in its range, so no value is silently meaningless (a negative learning
    rate, a ratio above 1, a limit below 0); each message names the key."""
    t, r, m = cfg.training, cfg.rollout, cfg.match
    rules = [
        ("training.learning_rate", t.learning_rate, ">0"), ("training.vit_lr", t.vit_lr, ">0"),
        ("training.aligner_lr", t.aligner_lr, ">0"),
        ("training.max_grad_norm", t.max_grad_norm, ">0"),
        ("training.weight_decay", t.weight_decay, ">=0"),
        ("training.warmup_ratio", t.warmup_ratio, "[0,1]"),
        ("training.min_lr_ratio", t.min_lr_ratio, "[0,1]"),
        ("training.max_minutes", t.max_minutes, ">=0"),
        ("training.effective_batch_size", t.effective_batch_size, ">=1"),
        ("training.save_total_limit", t.save_total_limit, ">=0"),
        ("training.seed", t.seed, "seed"),
        ("data.val_limit", cfg.data.val_limit, ">=0"),
        ("rollout.batch_size", r.batch_size, ">=1"),
        ("rollout.temperature", r.temperature, ">0"), ("rollout.top_p", r.top_p, "(0,1]"),
        ("rollout.repetition_penalty", r.repetition_penalty, ">0"),
        ("match.candidate_top_k", m.candidate_top_k, ">=1"),
        ("match.iou_gate", m.iou_gate, "[0,1]"), ("match.fp_cost", m.fp_cost, ">=0"),
        ("match.fn_cost", m.fn_cost, ">=0"),
        ("monitor_dump.max_samples", cfg.monitor_dump.max_samples, ">=0"),
    ]
    rules += [(f"{name}.{f.name}", getattr(section, f.name), ">=0")
              for name, section in (("coord_soft_ce_w1", cfg.coord_soft_ce_w1),
                                    ("stage2_ab", cfg.stage2_ab))
              for f in dataclasses.fields(section) if f.name.endswith("_weight")]
    for key, value, rule in rules:
        if not RANGES[rule](value):
            raise UserError(f"'{key}' must be {RULE_TEXT.get(rule, rule)}, got {value}")
    if t.metric_for_best not in BEST_METRICS:
        raise UserError(f"'training.metric_for_best' must be one of {', '.join(BEST_METRICS)}; "
                        f"got {t.metric_for_best!r}")


RANGES = {">0": lambda v: v > 0, ">=0": lambda v: v >= 0, ">=1": lambda v: v >= 1,
          "[0,1]": lambda v: 0 <= v <= 1, "(0,1]": lambda v: 0 < v <= 1,
          "seed": lambda v: 0 <= v < 2**32}
RULE_TEXT = {">0": "> 0", ">=0": ">= 0", ">=1": ">= 1", "[0,1]": "in [0, 1]",
             "(0,1]": "in (0, 1]", "seed": "in [0, 2**32)"}


def packing_notes(cfg: Config) -> list[str]:
    """What static packing leaves padded: Channel A with n_softctx_iter > 1."""
    s = cfg.stage2_ab
    if cfg.training.packing != "static" or cfg.training.stage != "stage2_ab" or \
            s.n_softctx_iter == 1 or s.schedule.b_ratio == 1:
        return []
    return ["note: training.packing=static packs Stage 1, Channel B and Channel A with "
            "n_softctx_iter 1; this Channel A (n_softctx_iter > 1) runs each pack's samples "
            "right-padded, since its shared prefix needs rows that start at position 0"]


def config_to_dict(cfg: Config) -> dict:
    """Plain dicts and lists (YAML-safe: tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value
