"""`coordexp report`: a run directory -> report.md, report.html, report.json and PNG plots
(the seed note's analysis: eval table and trends, diagnostics, correlations, dump failure
patterns, overlays); `--compare` puts several runs side by side. See docs/report.md."""

from __future__ import annotations

from pathlib import Path

from coordexp.errors import UserError
from coordexp.files import check_output_dir
from coordexp.report.analysis import parse_corr_pairs
from coordexp.report.build import analyze_run, write_report
from coordexp.report.compare import write_compare
from coordexp.report.load import Run, load_run

__all__ = ["Run", "analyze_run", "load_run", "report_command", "write_compare", "write_report"]


def report_command(run_dir: str | None, *, out: str = "", compare: list[str] = (),
                   window: int = 10, corr: list[str] = ()) -> int:
    """CLI entry: one run (RUN_DIR) or several (RUN_DIR plus --compare RUN ...)."""
    paths = ([run_dir] if run_dir else []) + list(compare)
    if not paths:
        raise UserError("report needs a RUN_DIR (or --compare RUN RUN ...)")
    if window < 1:
        raise UserError(f"--window must be a positive number of train rows, got {window}")
    pairs = parse_corr_pairs(list(corr))
    runs = [load_run(p) for p in paths]
    default = runs[0].path / ("report" if len(runs) == 1 else "report_compare")
    check_output_dir(out or default, "--out")
    if len(runs) == 1:
        target = Path(out) if out else runs[0].path / "report"
        report = write_report(runs[0], target, window=window, corr=pairs)
        _print_summary(report)
    else:
        target = Path(out) if out else runs[0].path / "report_compare"
        write_compare(runs, target, window=window, corr=pairs)
    print(f"report: {target / 'report.html'} (also report.md, report.json)")
    return 0


def _print_summary(report: dict) -> None:
    from coordexp.report.analysis import fmt

    for row in report["eval_table"]:
        print(f"step {row['step']}: mAP {fmt(row['rollout/mAP'])}  f1 {fmt(row['rollout/f1'])}  "
              f"pred {fmt(row['rollout/pred_objects'])}  matched {fmt(row['rollout/matched'])}")
    for note in report["missing"]:
        print(f"note: {note}")
