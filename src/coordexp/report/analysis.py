"""Numbers from logging.jsonl: the eval table, trends in words, train diagnostics near each eval
step, and Pearson correlations between logged series (definitions: upstream.md section 10)."""

from __future__ import annotations

import math

import numpy as np

from coordexp.errors import UserError

EVAL_KEYS = (
    "rollout/mAP", "rollout/AP50", "rollout/f1", "rollout/precision", "rollout/recall",
    "rollout/pred_objects", "rollout/matched", "rollout/fp_total", "rollout/fn_total",
    "rollout/parse_dropped_invalid", "rollout/parse_dropped_ambiguous",
    "rollout/parse_truncated_rate", "rollout/sample_valid_pred_rate",
)
# duplicate statistics and the guarded view (coordexp.eval.duplicates), beside raw F1 and AP50
DUP_KEYS = ("rollout/dup_share", "rollout/dup_pairs_per_image", "rollout/dup_clusters_per_image",
            "rollout/dup_max_cluster_size", "rollout/dup_hit_max_new_tokens_rate",
            "rollout/AP50", "rollout/guarded/AP50", "rollout/f1", "rollout/guarded/f1",
            "rollout/guarded/precision", "rollout/guarded/recall")
COUNT_KEYS = ("rollout/pred_objects", "rollout/matched", "rollout/fp_total", "rollout/fn_total",
              "rollout/parse_dropped_invalid", "rollout/parse_dropped_ambiguous")
DIAG_KEYS = (
    "coord_diag/expected_bin_mae", "coord_diag/expected_bin_abs_err_p90",
    "coord_diag/acc_top5", "coord_diag/p_gt_mean", "coord_diag/margin_mean",
    "coord_diag/coord_vocab_mass_mean", "loss/coord_gate",
)
DEFAULT_CORR = ("coord_diag/coord_tokens", "loss/coord_soft_ce")
FLAT_REL = 0.03  # |last - first| within 3% of the larger magnitude reads as flat
MIN_CORR_ROWS = 3


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logs a finite number under key."""
    return [(r["step"], r[key]) for r in rows if is_number(r.get(key))]


def eval_table(eval_rows: list[dict], keys: tuple[str, ...] = EVAL_KEYS) -> list[dict]:
    """One row per eval step ({"step", *keys}, None where not logged); a step logged twice
    keeps its last row."""
    by_step = {r["step"]: r for r in eval_rows}
    return [{"step": s} | {k: _number_or_none(k, by_step[s].get(k)) for k in keys}
            for s in sorted(by_step)]


def duplicate_table(eval_rows: list[dict]) -> list[dict]:
    """eval_table over DUP_KEYS, for the eval steps that logged duplicate statistics."""
    return [r for r in eval_table(eval_rows, DUP_KEYS) if r["rollout/dup_share"] is not None]


def _number_or_none(key: str, value) -> float | int | None:
    """Finite numbers only; counts logged as integral floats become ints."""
    if not is_number(value):
        return None
    return int(value) if key in COUNT_KEYS and float(value).is_integer() else value


def trend(values: list[float | None]) -> dict | None:
    """First-to-last change of a series: direction rises / flat / falls, delta, relative change,
    range, and whether every step moved the same way. None with fewer than two numbers."""
    vals = [v for v in values if is_number(v)]
    if len(vals) < 2:
        return None
    first, last = vals[0], vals[-1]
    delta = last - first
    flat = abs(delta) <= FLAT_REL * max(abs(first), abs(last))
    steps = np.diff(vals)
    return {"direction": "flat" if flat else ("rises" if delta > 0 else "falls"),
            "first": first, "last": last, "delta": delta,
            "relative": delta / abs(first) if first else None,
            "min": min(vals), "max": max(vals),
            "monotonic": bool((steps >= 0).all() or (steps <= 0).all())}


def fmt(value) -> str:
    """Table formatting: ints as ints, floats to about four significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    size = abs(value)
    if size >= 100:
        return f"{value:.1f}"
    if size >= 10:
        return f"{value:.2f}"
    if size >= 0.001 or value == 0:
        return f"{value:.4f}"
    return f"{value:.3g}"


def fmt_delta(value) -> str:
    return ("+" if value >= 0 else "") + fmt(value)


def describe_trend(name: str, t: dict | None) -> str:
    """One sentence, e.g. 'f1 rises from 0.6209 to 0.6460 (+0.0251, +4.0%), steadily.'"""
    if t is None:
        return f"{name}: fewer than two values, no trend."
    change = fmt_delta(t["delta"])
    if t["relative"] is not None:
        change += f", {t['relative'] * 100:+.1f}%"
    span = f"{fmt(t['first'])} to {fmt(t['last'])} ({change})"
    if t["direction"] == "flat":
        return f"{name} is flat: {span}; range {fmt(t['min'])}..{fmt(t['max'])}."
    how = "steadily" if t["monotonic"] else f"not monotonically (range {fmt(t['min'])}.." \
                                            f"{fmt(t['max'])})"
    return f"{name} {t['direction']} from {span}, {how}."


def table_trends(rows: list[dict], keys: tuple[str, ...]) -> dict[str, dict | None]:
    return {k: trend([r.get(k) for r in rows]) for k in keys if any(is_number(r.get(k))
                                                                     for r in rows)}


def near_step_means(train_rows: list[dict], steps: list[int], keys: tuple[str, ...],
                    window: int) -> list[dict]:
    """Per step: the mean of each key over the `window` train rows nearest that step (by
    |row step - step|, earlier first on ties) among the rows that log the key; None if none do."""
    table = []
    per_key = {k: series(train_rows, k) for k in keys}
    for step in steps:
        row = {"step": step}
        for key, points in per_key.items():
            near = sorted(points, key=lambda p, s=step: (abs(p[0] - s), p[0]))[:window]
            row[key] = float(np.mean([v for _, v in near])) if near else None
        table.append(row)
    return table


def pearson(train_rows: list[dict], key_a: str, key_b: str) -> tuple[float | None, int]:
    """Pearson r over the train rows logging both keys, and that row count; r is None with
    fewer than MIN_CORR_ROWS rows or a constant series."""
    pairs = [(r[key_a], r[key_b]) for r in train_rows
             if is_number(r.get(key_a)) and is_number(r.get(key_b))]
    if len(pairs) < MIN_CORR_ROWS:
        return None, len(pairs)
    x, y = np.asarray(pairs, dtype=np.float64).T  # [n], [n]
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    if denom == 0:
        return None, len(pairs)
    return float((xc * yc).sum() / denom), len(pairs)


def parse_corr_pairs(specs: list[str]) -> list[tuple[str, str]]:
    """'A~B' strings from --corr -> (A, B); UserError on anything else."""
    pairs = []
    for spec in specs:
        a, sep, b = spec.partition("~")
        if not sep or not a.strip() or not b.strip() or "~" in b:
            raise UserError(f"--corr {spec!r} must name two logged series as A~B, e.g. "
                            "coord_diag/coord_tokens~loss/coord_soft_ce")
        pairs.append((a.strip(), b.strip()))
    return pairs


def correlations(train_rows: list[dict], extra: list[tuple[str, str]],
                 missing: list[str]) -> dict[str, dict]:
    """"A~B" -> {"r", "rows"}: the default pair when both series are logged, plus every pair
    asked for (r None and a note in `missing` when a series is absent)."""
    logged = {k for r in train_rows for k, v in r.items() if is_number(v)}
    pairs = [DEFAULT_CORR] if set(DEFAULT_CORR) <= logged else []
    pairs += [p for p in extra if p not in pairs]
    out = {}
    for a, b in pairs:
        r, n = pearson(train_rows, a, b)
        out[f"{a}~{b}"] = {"r": r, "rows": n}
        absent = [k for k in (a, b) if k not in logged]
        if absent:
            missing.append(f"correlation {a}~{b}: {', '.join(absent)} not in the train rows")
        elif r is None:
            missing.append(f"correlation {a}~{b}: undefined ({n} rows, or a constant series)")
    return out


def diagnostic_steps(eval_steps: list[int], dump_steps: list[int],
                     train_rows: list[dict]) -> tuple[list[int], str]:
    """Where to average diagnostics, and what those steps are: eval steps, else dump steps,
    else the last train step."""
    if eval_steps:
        return eval_steps, "eval steps"
    if dump_steps:
        return dump_steps, "monitor-dump steps (no eval rows)"
    if train_rows:
        return [train_rows[-1]["step"]], "last train step (no eval rows or dumps)"
    return [], "no steps"
