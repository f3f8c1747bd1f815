"""Report sections from the monitor dumps: per-dump summary, per-sample failure patterns
(class histograms, near-duplicates, ordering, worst F1, crowded scenes) and overlays."""

from __future__ import annotations

import re
from pathlib import Path

from coordexp.report.analysis import fmt
from coordexp.report.dumps import crowded_scenes, duplicate_classes, worst_samples
from coordexp.report.load import Run, resolve_image
from coordexp.report.plots import plot_overlay
from coordexp.report.render import Block, Bullets, Figure, Heading, Para, Table

OVERLAY_MAX = 12
HIST_SHOWN = 3


def hist_text(hist: dict[str, int], limit: int = HIST_SHOWN) -> str:
    """'book 38, chair 2, +3 more' (most common first)."""
    items = [f"{k} {v}" for k, v in list(hist.items())[:limit]]
    rest = len(hist) - limit
    return ", ".join(items + ([f"+{rest} more"] if rest > 0 else [])) or "none"


def summary_section(report: dict) -> list[Block]:
    blocks: list[Block] = [Heading(2, "5. Monitor dumps")]
    dumps = report["dumps"]
    if not dumps:
        return blocks + [Para("No monitor dumps in this run.")]
    headers = ["step", "samples", "mean GT", "mean pred", "mean matched", "mean F1",
               "invalid / truncated", "dropped invalid / ambiguous"]
    rows = []
    for d in dumps:
        s = d["summary"]
        rows.append([str(d["step"]), str(s["samples"]), fmt(s["mean_gt_objects"]),
                     fmt(s["mean_pred_objects"]), fmt(s["mean_matched"]), fmt(s["mean_f1"]),
                     f"{s['invalid']} / {s['truncated']}",
                     f"{s['dropped_invalid']} / {s['dropped_ambiguous']}"])
    blocks += [Para("Means over the dumped samples (a few per eval, failures first: not the "
                    "whole eval set)."), Table(headers, rows), Para(_format_health(dumps))]
    return blocks


def _format_health(dumps: list[dict]) -> str:
    keys = ("invalid", "truncated", "dropped_invalid", "dropped_ambiguous")
    totals = {k: sum(d["summary"][k] for d in dumps) for k in keys}
    samples = sum(d["summary"]["samples"] for d in dumps)
    if not any(totals.values()):
        return (f"No format corruption in the {samples} dumped samples: no invalid or truncated "
                "rollouts and no dropped objects.")
    return (f"Format problems in the {samples} dumped samples: {totals['invalid']} invalid and "
            f"{totals['truncated']} truncated rollouts, {totals['dropped_invalid']} objects "
            f"dropped as invalid and {totals['dropped_ambiguous']} as ambiguous.")


def patterns_section(report: dict, run: Run) -> list[Block]:
    dumps = report["dumps"]
    if not dumps:
        return []
    headers = ["step", "sample", "GT", "pred", "matched", "precision", "recall", "F1",
               "dup pairs IoU>=0.9", "dup pairs IoU>=0.95", "order violations",
               "pred classes", "GT classes"]
    rows = [[str(d["step"]), str(s["sample_id"]), str(s["gt_objects"]), str(s["pred_objects"]),
             str(s["matched"]), fmt(s["precision"]), fmt(s["recall"]), fmt(s["f1"]),
             str(s["near_dup_pairs_iou90"]), str(s["near_dup_pairs_iou95"]),
             str(s["ordering_violations"]), hist_text(s["pred_class_hist"]),
             hist_text(s["gt_class_hist"])]
            for d in dumps for s in d["samples"]]
    latest_raw = {s["sample_id"]: s for s in run.dumps[-1]["samples"]}
    return [Heading(2, "6. Failure patterns in the dumped rollouts"),
            Para("Near-duplicate pair: two predictions of one sample with the same `desc` and box "
                 "IoU at or above the threshold. Ordering violation: a prediction whose (y1, x1) "
                 "anchor comes before the previous one's (emission order)."),
            Table(headers, rows),
            Heading(3, f"Latest dump (step {dumps[-1]['step']})"),
            Bullets(_latest_findings(dumps[-1])),
            *_worst_blocks(dumps, latest_raw),
            *_crowded_blocks(list(latest_raw.values()))]


def _latest_findings(dump: dict) -> list[str]:
    s = dump["summary"]
    samples = dump["samples"]
    with_dups = sum(r["near_dup_pairs_iou90"] > 0 for r in samples)
    preds = sum(r["pred_objects"] for r in samples)
    return [f"near-duplicate pairs: {s['near_dup_pairs_iou90']} at IoU >= 0.9 and "
            f"{s['near_dup_pairs_iou95']} at IoU >= 0.95, in {with_dups} of {len(samples)} "
            "samples",
            f"ordering: {s['ordering_violations']} violation(s) of the (y1, x1) anchor over "
            f"{preds} predicted objects",
            f"mean F1 {fmt(s['mean_f1'])}; predicted {fmt(s['mean_pred_objects'])} objects per "
            f"sample for {fmt(s['mean_gt_objects'])} GT"]


def _worst_blocks(dumps: list[dict], latest_raw: dict) -> list[Block]:
    worst = worst_samples(dumps)
    if not worst:
        return [Para("Every sample of the latest dump has F1 = 1.")]
    return [Heading(3, "Worst samples by F1 (latest dump)"),
            Bullets([_worst_text(r, latest_raw[r["sample_id"]]) for r in worst])]


def _worst_text(r: dict, raw: dict) -> str:
    text = (f"sample {r['sample_id']}: GT {r['gt_objects']}, pred {r['pred_objects']}, "
            f"matched {r['matched']}, precision {fmt(r['precision'])}, recall "
            f"{fmt(r['recall'])}, F1 {fmt(r['f1'])}; predicted {hist_text(r['pred_class_hist'])}"
            f" vs GT {hist_text(r['gt_class_hist'])}")
    for d in duplicate_classes(raw)[:2]:
        text += (f"; {d['pred']} `{d['desc']}` boxes hold {d['iou90']} near-duplicate pairs at "
                 f"IoU >= 0.9 ({d['iou95']} at >= 0.95)")
    text += f"; {r['ordering_violations']} ordering violation(s)"
    if len(r["f1_history"]) > 1:
        text += "; F1 by dump step: " + ", ".join(f"{s}: {fmt(f)}" for s, f in r["f1_history"])
    return text + "."


def _crowded_blocks(samples: list[dict]) -> list[Block]:
    crowded = [c for c in map(crowded_scenes, samples) if c is not None]
    if not crowded:
        return []
    rows = [[str(c["sample_id"]), c["desc"], str(c["gt"]), str(c["pred"]), str(c["matched"]),
             str(c["gt_total"])] for c in crowded]
    return [Heading(3, "Crowded scenes (latest dump: one class with >= 5 GT objects)"),
            Table(["sample", "class", "GT of class", "predicted of class", "matched of class",
                   "GT total"], rows)]


def overlay_section(run: Run, out: Path) -> list[Block]:
    """Overlays of the latest dump's samples (at most OVERLAY_MAX), into out/overlays/."""
    if not run.dumps:
        return []
    dump = run.dumps[-1]
    step = dump["global_step"]
    folder = out / "overlays"
    folder.mkdir(exist_ok=True)
    blocks: list[Block] = [Heading(2, f"7. Ground truth vs prediction (dump step {step})"),
                           Para("Green: matched; red: false positive prediction; purple: missed "
                                "ground truth.")]
    absent = []
    for sample in dump["samples"][:OVERLAY_MAX]:
        safe_id = re.sub(r"[^\w.-]", "_", str(sample["sample_id"]))
        name = f"overlays/step_{step:06d}_sample_{safe_id}.png"
        image = resolve_image(run.path, str(sample.get("image", "")))
        _, found = plot_overlay(sample, image, out / name)
        absent += [] if found else [str(image)]
        blocks.append(Figure(name, f"sample {sample['sample_id']} at step {step}"))
    if absent:
        run.missing.append(f"{len(absent)} dumped image(s) unreadable, overlays drawn on a blank "
                           f"canvas (first: {absent[0]})")
    return blocks
