"""Provenance (run_metadata.json) and the key knobs (resolved_config.yaml) as label -> text."""

from __future__ import annotations

# (label, dotted config key, stages it applies to)
STAGE2 = ("stage2_ab",)
STAGE1 = ("stage1",)
BOTH = ("stage1", "stage2_ab")
KNOBS = (
    ("trainer stage", "training.stage", BOTH),
    ("channel routing (schedule.b_ratio)", "stage2_ab.schedule.b_ratio", STAGE2),
    ("n_softctx_iter", "stage2_ab.n_softctx_iter", STAGE2),
    ("softctx_grad_mode", "stage2_ab.softctx_grad_mode", STAGE2),
    ("coord_ctx_embed_mode", "stage2_ab.coord_ctx_embed_mode", STAGE2),
    ("coord_decode_mode", "stage2_ab.coord_decode_mode", STAGE2),
    ("bbox_smoothl1_weight", "stage2_ab.bbox_smoothl1_weight", STAGE2),
    ("bbox_ciou_weight", "stage2_ab.bbox_ciou_weight", STAGE2),
    ("bbox_smoothl1_weight", "coord_soft_ce_w1.bbox_smoothl1_weight", STAGE1),
    ("bbox_ciou_weight", "coord_soft_ce_w1.bbox_ciou_weight", STAGE1),
    ("soft_ce_weight", "coord_soft_ce_w1.soft_ce_weight", BOTH),
    ("w1_weight", "coord_soft_ce_w1.w1_weight", BOTH),
    ("gate_weight", "coord_soft_ce_w1.gate_weight", STAGE1),
    ("coord_gate_weight", "stage2_ab.coord_gate_weight", STAGE2),
    ("target_sigma", "coord_soft_ce_w1.target_sigma", BOTH),
    ("target_truncate", "coord_soft_ce_w1.target_truncate", BOTH),
    ("temperature", "coord_soft_ce_w1.temperature", BOTH),
    ("hard coord CE (coord_ce_weight)", "stage2_ab.coord_ce_weight", STAGE2),
    ("hard coord CE (ce_weight)", "coord_soft_ce_w1.ce_weight", STAGE1),
    ("max_steps", "training.max_steps", BOTH),
    ("eval cadence (eval_steps)", "training.eval_steps", BOTH),
    ("monitor dumps (max_samples)", "monitor_dump.max_samples", BOTH),
)
HARD_CE_KEYS = ("stage2_ab.coord_ce_weight", "coord_soft_ce_w1.ce_weight")
ABSENT = object()  # a key the config lacks (None is a value: `null`)


def lookup(config: dict, dotted: str, default=ABSENT):
    """config["a"]["b"] for "a.b"; `default` if absent."""
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def describe_knob(dotted: str, value) -> str:
    if dotted.endswith("b_ratio") and isinstance(value, int | float):
        words = {0: "Channel-A only", 1: "Channel-B only"}.get(value, "A/B mix")
        return f"{value} ({words})"
    if dotted in HARD_CE_KEYS and isinstance(value, int | float):
        return f"on ({value})" if value else "off (0)"
    if dotted == "monitor_dump.max_samples" and isinstance(value, int):
        return f"{value}" if value else "off"
    return "null" if value is None else str(value)


def key_knobs(config: dict) -> list[tuple[str, str, str]]:
    """(label, dotted key, text) for the knobs that apply to the run's stage and are present."""
    stage = config.get("training", {}).get("stage", "stage2_ab")
    dumps_on = lookup(config, "monitor_dump.enabled", True)
    out = []
    for label, dotted, stages in KNOBS:
        value = lookup(config, dotted)
        if stage not in stages or value is ABSENT:
            continue
        if dotted == "monitor_dump.max_samples" and not dumps_on:
            value = 0
        out.append((label, dotted, describe_knob(dotted, value)))
    return out


def provenance(metadata: dict) -> list[tuple[str, str]]:
    """(label, text) rows from run_metadata.json; absent fields are skipped."""
    git = metadata.get("git", {})
    rows = [("created_at", metadata.get("created_at")),
            ("git", _git_text(git) if git else None),
            ("seed", metadata.get("seed")),
            ("trainer variant", metadata.get("trainer_variant")),
            ("world size", metadata.get("world_size")),
            ("python", metadata.get("python")),
            ("packages", _packages_text(metadata.get("packages"))),
            ("command", " ".join(map(str, metadata["command"])) if metadata.get("command")
             else None)]
    return [(label, str(value)) for label, value in rows if value is not None]


def _git_text(git: dict) -> str:
    if not git.get("sha"):
        return "not recorded (not run from a git checkout)"
    dirty = "dirty" if git.get("dirty") else "clean"
    return f"{git.get('branch') or '?'} @ {git.get('sha') or '?'} ({dirty})"


def _packages_text(packages) -> str | None:
    if not isinstance(packages, dict) or not packages:
        return None
    return ", ".join(f"{k} {v}" for k, v in packages.items() if v)
