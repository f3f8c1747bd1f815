"""Several runs side by side (the A/B runs of the seed note's section 6): knobs, eval table,
diagnostics near eval steps, correlations and dump summaries, one column per run."""

from __future__ import annotations

from pathlib import Path

from coordexp.report.analysis import DIAG_KEYS, EVAL_KEYS, fmt, fmt_delta, is_number, series
from coordexp.report.build import write_documents, write_report
from coordexp.report.load import Run
from coordexp.report.plots import Line, Panel, plot_panels
from coordexp.report.render import Block, Bullets, Figure, Heading, Para, Table
from coordexp.report.sections import short

DUMP_STATS = ("mean_gt_objects", "mean_pred_objects", "mean_matched", "mean_f1", "invalid",
              "truncated", "near_dup_pairs_iou90", "near_dup_pairs_iou95", "ordering_violations")


def run_labels(paths: list[Path]) -> list[str]:
    """Shortest trailing path parts that tell the runs apart ('run', or 'runs2/run')."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]  # the same directory given twice


def side_by_side(per_run: list[list[dict]], keys: tuple[str, ...], labels: list[str]) -> Table:
    """Long table: (metric, step) rows, one column per run, then each run minus the first."""
    lookup = [{r["step"]: r for r in rows} for rows in per_run]
    steps = sorted({s for by_step in lookup for s in by_step})
    headers = ["metric", "step", *labels] + [f"{lab} - {labels[0]}" for lab in labels[1:]]
    body = []
    for key in keys:
        for step in steps:
            values = [by_step.get(step, {}).get(key) for by_step in lookup]
            if not any(is_number(v) for v in values):
                continue
            deltas = [fmt_delta(v - values[0]) if is_number(v) and is_number(values[0])
                      else "n/a" for v in values[1:]]
            body.append([short(key), str(step), *map(fmt, values), *deltas])
    return Table(headers, body)


def table_or_note(table: Table, note: str, intro: str = "") -> list[Block]:
    """The table (after an intro line) when it has rows, else the note (if any)."""
    if table.rows:
        return [Para(intro), table] if intro else [table]
    return [Para(note)] if note else []


def trend_short(t: dict | None) -> str:
    if t is None:
        return "n/a"
    rel = f" ({t['relative'] * 100:+.1f}%)" if t["relative"] is not None else ""
    return f"{t['direction']} {fmt_delta(t['delta'])}{rel}"


def trend_table(reports: list[dict], field: str, labels: list[str]) -> Table:
    keys = [k for k in (EVAL_KEYS if field == "eval_trends" else DIAG_KEYS)
            if any(r[field].get(k) for r in reports)]
    return Table(["metric", *labels],
                 [[short(k), *(trend_short(r[field].get(k)) for r in reports)] for k in keys])


def knob_table(reports: list[dict], labels: list[str]) -> Table:
    per_run = [{k["key"]: k["value"] for k in r["knobs"]} for r in reports]
    keys = list(dict.fromkeys(k for knobs in per_run for k in knobs))
    rows = []
    for key in keys:
        values = [knobs.get(key, "n/a") for knobs in per_run]
        rows.append([key, *values, "yes" if len(set(values)) > 1 else ""])
    rows.sort(key=lambda row: row[-1] != "yes")  # the knobs that differ first (stable)
    return Table(["config key", *labels, "differs"], rows)


def compare_plot(runs: list[Run], reports: list[dict], labels: list[str], out: Path) -> list:
    eval_rows = [r["eval_table"] for r in reports]
    panels = [_panel(key, eval_rows, labels, markers=True)
              for key in ("rollout/mAP", "rollout/f1", "rollout/precision", "rollout/recall")]
    panels += [_panel(key, [run.train_rows for run in runs], labels, markers=False)
               for key in ("coord_diag/expected_bin_mae", "coord_diag/acc_top5",
                           "loss/coord_soft_ce")]
    panels = [p for p in panels if p.lines]
    if not panels:
        return []
    plot_panels(panels, out / "compare.png")
    return [Figure("compare.png", "eval metrics (dots) and train series (lines), one colour "
                                  "per run")]


def _panel(key: str, per_run: list[list[dict]], labels: list[str], markers: bool) -> Panel:
    """One line per run that logged `key`."""
    points = [(lab, series(rows, key)) for lab, rows in zip(labels, per_run, strict=True)]
    return Panel(short(key), [Line(lab, [s for s, _ in p], [v for _, v in p], markers=markers)
                              for lab, p in points if p])


def header_blocks(runs: list[Run], reports: list[dict], labels: list[str]) -> list[Block]:
    """Title, which runs, what is missing in each, and the knobs side by side."""
    missing = [f"{lab}: {note}" for lab, r in zip(labels, reports, strict=True)
               for note in r["missing"]]
    runs_table = Table(["run", "directory", "created_at", "git"],
                       [[lab, str(run.path.resolve()), r["provenance"].get("created_at", "n/a"),
                         r["provenance"].get("git", "n/a")]
                        for lab, run, r in zip(labels, runs, reports, strict=True)])
    return [Heading(1, "CoordExp comparison: " + " vs ".join(labels)), runs_table,
            Para("Each run's own report (plots and overlays) is in `runs/<label>/` beside this "
                 "page (`/` in a label becomes `__`)."),
            *([Heading(2, "Missing or partial data"), Bullets(missing)] if missing else []),
            Heading(2, "1. Knobs"), knob_table(reports, labels)]


def table_blocks(reports: list[dict], labels: list[str]) -> list[Block]:
    """Eval, diagnostics, correlations and dump summaries, one column per run."""
    corr_keys = list(dict.fromkeys(k for r in reports for k in r["correlations"]))
    corr = Table(["series A ~ series B", *labels],
                 [[k, *(fmt(r["correlations"].get(k)) for r in reports)] for k in corr_keys])
    dump_rows = [[{"step": d["step"], **d["summary"]} for d in r["dumps"]] for r in reports]
    return [
        Heading(2, "2. Eval over steps"),
        *table_or_note(side_by_side([r["eval_table"] for r in reports], EVAL_KEYS, labels),
                       "No eval rows in any run."),
        *table_or_note(trend_table(reports, "eval_trends", labels), "",
                       "Trends, first to last eval step:"),
        Heading(2, "3. Train diagnostics near eval steps"),
        *table_or_note(side_by_side([r["diagnostics_near_eval"] for r in reports], DIAG_KEYS,
                                    labels), "No coord diagnostics in any run."),
        *table_or_note(trend_table(reports, "diagnostics_trends", labels), "",
                       "Trends of the near-step means:"),
        Heading(2, "4. Correlations (Pearson r)"),
        *table_or_note(corr, "No correlation could be computed."),
        Heading(2, "5. Monitor dumps"),
        *table_or_note(side_by_side(dump_rows, DUMP_STATS, labels), "No monitor dumps in any run."),
    ]


def write_compare(runs: list[Run], out: Path, *, window: int,
                  corr: list[tuple[str, str]]) -> dict:
    """runs/<label>/ per run, then report.md / report.html / report.json side by side."""
    labels = run_labels([r.path for r in runs])
    reports = [write_report(run, out / "runs" / lab.replace("/", "__"), window=window, corr=corr)
               for run, lab in zip(runs, labels, strict=True)]
    blocks = [*header_blocks(runs, reports, labels), *table_blocks(reports, labels),
              *compare_plot(runs, reports, labels, out)]
    combined = {"runs": labels, "reports": dict(zip(labels, reports, strict=True))}
    write_documents(blocks, combined, out, "CoordExp comparison")
    return combined
