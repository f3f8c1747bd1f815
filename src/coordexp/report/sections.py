"""Report sections from logging.jsonl and the run files: missing data, provenance and knobs, the
eval table with trends, train diagnostics near eval steps, losses, and correlations."""

from __future__ import annotations

from pathlib import Path

from coordexp.report.analysis import (
    DIAG_KEYS,
    DUP_KEYS,
    EVAL_KEYS,
    describe_trend,
    fmt,
    is_number,
    series,
)
from coordexp.report.load import Run
from coordexp.report.plots import Line, Panel, plot_panels, plot_scatter
from coordexp.report.readings import (
    coord_tokens_reading,
    diagnostics_reading,
    eval_reading,
    strength,
)
from coordexp.report.render import Block, Bullets, Figure, Heading, Para, Table

EVAL_PLOTS = {
    "eval_metrics.png": ("rollout/mAP", "rollout/AP50", "rollout/f1", "rollout/precision",
                         "rollout/recall"),
    "eval_counts.png": ("rollout/pred_objects", "rollout/matched", "rollout/fp_total",
                        "rollout/fn_total"),
}
LOSS_KEYS = ("loss", "loss/token_ce", "loss/coord_soft_ce", "loss/coord_w1", "loss/coord_gate",
             "loss/coord_token_ce", "loss/bbox_smoothl1", "loss/bbox_ciou", "loss/coord_reg")


def short(key: str) -> str:
    """'rollout/mAP' -> 'mAP', 'coord_diag/acc_top5' -> 'acc_top5' (table headers)."""
    return key.split("/", 1)[1] if key.startswith(("rollout/", "coord_diag/")) else key


def missing_section(report: dict) -> list[Block]:
    if not report["missing"]:
        return []
    return [Heading(2, "Missing or partial data"), Bullets(report["missing"])]


def provenance_section(report: dict) -> list[Block]:
    blocks: list[Block] = [Heading(2, "1. Provenance and key knobs")]
    if report["provenance"]:
        blocks.append(Table(["field", "value"], [[k, v] for k, v in report["provenance"].items()]))
    if report["knobs"]:
        blocks.append(Table(["knob", "config key", "value"],
                            [[k["label"], k["key"], k["value"]] for k in report["knobs"]]))
    if len(blocks) == 1:
        blocks.append(Para("No run_metadata.json or resolved_config.yaml in this run."))
    return blocks


def keyed_table(rows: list[dict], keys: tuple[str, ...]) -> Table:
    """Rows of {"step", key...} as a table with one column per key that has any value."""
    shown = [k for k in keys if any(r.get(k) is not None for r in rows)]
    return Table(["step"] + [short(k) for k in shown],
                 [[str(r["step"])] + [fmt(r.get(k)) for k in shown] for r in rows])


def trend_bullets(trends: dict[str, dict | None]) -> Bullets:
    return Bullets([describe_trend(f"`{short(k)}`", t) for k, t in trends.items()])


def eval_section(report: dict, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading(2, "2. Eval over steps")]
    rows = report["eval_table"]
    if not rows:
        return blocks + [Para("No eval rows in logging.jsonl yet: nothing to tabulate.")]
    blocks += [Para(f"{len(rows)} eval step(s), `rollout/*` metrics as logged "
                    "(counts are over the whole eval set)."),
               keyed_table(rows, EVAL_KEYS)]
    if report["duplicates_table"]:
        blocks += [Para("Duplicates: `dup_share` is the share of predictions that a guard "
                        "keeping the best-scored member of each duplicate cluster (same desc, "
                        "IoU >= 0.9, linked pairs joined) would remove; `guarded/*` are the "
                        "metrics of those guarded predictions, beside the raw ones."),
                   keyed_table(report["duplicates_table"], DUP_KEYS)]
    if len(rows) > 1:
        blocks += [Para("Trends, first to last eval step (flat: within 3% of the larger value):"),
                   trend_bullets(report["eval_trends"]),
                   *map(Para, eval_reading(report["eval_trends"]))]
    for name, keys in EVAL_PLOTS.items():
        panels = [Panel(short(k), [Line(short(k), [r["step"] for r in rows if is_number(r[k])],
                                        [r[k] for r in rows if is_number(r[k])], markers=True)])
                  for k in keys if any(is_number(r[k]) for r in rows)]
        if panels:
            plot_panels(panels, out / name)
            blocks.append(Figure(name, f"eval {', '.join(p.title for p in panels)} over steps"))
    return blocks


def diagnostics_section(report: dict, run: Run, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading(2, "3. Train diagnostics near eval steps")]
    rows = report["diagnostics_near_eval"]
    if not rows or all(r.get(k) is None for r in rows for k in DIAG_KEYS):
        return blocks + [Para("No coord diagnostics in the train rows.")]
    window, where = report["diagnostics_window"], report["diagnostics_at"]
    blocks += [Para(f"Each value is the mean of the {window} train rows nearest the step "
                    f"(among rows that log the metric), at the {where}; `coord_gate` is "
                    "`loss/coord_gate`."),
               keyed_table(rows, DIAG_KEYS)]
    if len(rows) > 1:
        blocks += [Para("Trends of these means, first to last step:"),
                   trend_bullets(report["diagnostics_trends"]),
                   *map(Para, diagnostics_reading(report["diagnostics_trends"], rows))]
    panels = [_trace_panel(run, k, rows) for k in DIAG_KEYS if series(run.train_rows, k)]
    plot_panels(panels, out / "diagnostics.png")
    blocks.append(Figure("diagnostics.png", "train diagnostics per logged step (line) and the "
                                            "near-step means (dots)"))
    return blocks + _loss_blocks(run, out)


def _trace_panel(run: Run, key: str, near_rows: list[dict]) -> Panel:
    steps, values = zip(*series(run.train_rows, key), strict=True)
    near = [(r["step"], r[key]) for r in near_rows if r.get(key) is not None]
    lines = [Line("train", list(steps), list(values))]
    if near:
        lines.append(Line("near-step mean", [s for s, _ in near], [v for _, v in near], True))
    return Panel(short(key), lines)


def _loss_blocks(run: Run, out: Path) -> list[Block]:
    panels = []
    for key in LOSS_KEYS:
        points = series(run.train_rows, key)
        if points and any(v != 0 for _, v in points):
            panels.append(Panel(key, [Line(key, [s for s, _ in points], [v for _, v in points])]))
    if not panels:
        return []
    plot_panels(panels, out / "losses.png", columns=3)
    return [Figure("losses.png", "train loss terms per logged step (identically-zero terms "
                                 "omitted)")]


def correlation_section(report: dict, run: Run, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading(2, "4. Correlations between train series")]
    corr = report["correlations"]
    if not corr:
        return blocks + [Para("`coord_diag/coord_tokens` and `loss/coord_soft_ce` are not both "
                              "logged, and no `--corr A~B` was asked for.")]
    rows = [[name, fmt(r), str(report["correlation_rows"][name]),
             strength(r) if r is not None else "undefined"] for name, r in corr.items()]
    blocks.append(Table(["series A ~ series B", "Pearson r", "rows", "reading"], rows))
    default = corr.get("coord_diag/coord_tokens~loss/coord_soft_ce")
    if default is not None:
        blocks.append(Para(coord_tokens_reading(default)))
    for i, name in enumerate(n for n, r in corr.items() if r is not None):
        a, b = name.split("~")
        xs, ys = _paired(run.train_rows, a, b)
        plot_scatter(xs, ys, (a, b), corr[name], out / f"corr_{i}.png")
        blocks.append(Figure(f"corr_{i}.png", f"{a} vs {b} over train rows"))
    return blocks


def _paired(rows: list[dict], a: str, b: str) -> tuple[list[float], list[float]]:
    pairs = [(r[a], r[b]) for r in rows if is_number(r.get(a)) and is_number(r.get(b))]
    return [x for x, _ in pairs], [y for _, y in pairs]
