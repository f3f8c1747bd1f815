"""One run's report: the numbers (report.json) and the documents (report.md, report.html) with
their plots and overlays, written into one folder."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from coordexp.files import write_text_atomic
from coordexp.report.analysis import (
    DIAG_KEYS,
    EVAL_KEYS,
    correlations,
    diagnostic_steps,
    eval_table,
    near_step_means,
    table_trends,
)
from coordexp.report.dumps import analyze_dumps
from coordexp.report.failures import overlay_section, patterns_section, summary_section
from coordexp.report.knobs import key_knobs, provenance
from coordexp.report.load import Run
from coordexp.report.render import Block, Heading, Para, to_html, to_markdown
from coordexp.report.sections import (
    correlation_section,
    diagnostics_section,
    eval_section,
    missing_section,
    provenance_section,
)


def analyze_run(run: Run, *, window: int, corr: list[tuple[str, str]]) -> dict:
    """Every number of the report (the report.json content) from a loaded run."""
    table = eval_table(run.eval_rows)
    dumps = analyze_dumps(run.dumps)
    steps, where = diagnostic_steps([r["step"] for r in table], [d["step"] for d in dumps],
                             run.train_rows)
    near = near_step_means(run.train_rows, steps, DIAG_KEYS, window)
    corr_full = correlations(run.train_rows, corr, run.missing)
    return {
        "run": str(run.path),
        "provenance": dict(provenance(run.metadata)),
        "knobs": [{"label": label, "key": key, "value": value}
                  for label, key, value in key_knobs(run.config)],
        "eval_table": table,
        "eval_trends": table_trends(table, EVAL_KEYS),
        "diagnostics_window": window,
        "diagnostics_at": where,
        "diagnostics_near_eval": near,
        "diagnostics_trends": table_trends(near, DIAG_KEYS),
        "correlations": {name: c["r"] for name, c in corr_full.items()},
        "correlation_rows": {name: c["rows"] for name, c in corr_full.items()},
        "dumps": dumps,
        "missing": run.missing,
    }


def report_blocks(run: Run, report: dict, out: Path) -> list[Block]:
    """The document, writing its figures into out. Overlays go first: an unreadable image is a
    note in the 'missing' list shown at the top."""
    overlays = overlay_section(run, out)
    title = f"CoordExp run report: {run.path.resolve().name}"
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return [Heading(1, title),
            Para(f"Run directory `{run.path.resolve()}`; report written {when} from "
                 "`logging.jsonl`, the monitor dumps, `resolved_config.yaml` and "
                 "`run_metadata.json`."),
            *missing_section(report),
            *provenance_section(report),
            *eval_section(report, out),
            *diagnostics_section(report, run, out),
            *correlation_section(report, run, out),
            *summary_section(report),
            *patterns_section(report, run),
            *overlays]


def write_documents(blocks: list[Block], report: dict, out: Path, title: str) -> None:
    write_text_atomic(out / "report.md", to_markdown(blocks))
    write_text_atomic(out / "report.html", to_html(blocks, title))
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")


def write_report(run: Run, out: Path, *, window: int, corr: list[tuple[str, str]]) -> dict:
    """report.md, report.html, report.json and PNGs for one run, into out; returns the numbers."""
    out.mkdir(parents=True, exist_ok=True)
    report = analyze_run(run, window=window, corr=corr)
    blocks = report_blocks(run, report, out)
    write_documents(blocks, report, out, f"CoordExp report: {run.path.resolve().name}")
    return report
