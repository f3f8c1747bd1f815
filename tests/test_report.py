"""`coordexp report` on run directories built by hand: every number against a hand computation
(or numpy), missing data, not-a-run, valid markdown, HTML images, --compare, headless Chromium."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from coordexp.cli import main
from coordexp.report import report_command
from coordexp.report.analysis import describe_trend, fmt, table_trends, trend
from coordexp.report.readings import diagnostics_reading, eval_reading

STEPS = range(1, 21)
TOKENS = [56, 34, 80, 41, 60, 22, 95, 50, 47, 70, 33, 88, 64, 29, 75, 58, 44, 91, 38, 66]
SOFT_CE = [6.9, 6.6, 7.4, 6.7, 7.0, 6.2, 7.6, 6.8, 6.6, 7.1, 6.3, 7.3, 6.9, 6.1, 7.0, 6.8,
           6.5, 7.2, 6.4, 6.9]
EVAL = {
    10: {"rollout/mAP": 0.30, "rollout/AP50": 0.52, "rollout/f1": 0.60, "rollout/precision": 0.55,
         "rollout/recall": 0.66, "rollout/pred_objects": 100, "rollout/matched": 55,
         "rollout/fp_total": 45, "rollout/fn_total": 28, "rollout/parse_dropped_invalid": 0,
         "rollout/parse_dropped_ambiguous": 0, "rollout/parse_truncated_rate": 0.0,
         "rollout/sample_valid_pred_rate": 1.0},
    20: {"rollout/mAP": 0.305, "rollout/AP50": 0.55, "rollout/f1": 0.66, "rollout/precision": 0.66,
         "rollout/recall": 0.66, "rollout/pred_objects": 90, "rollout/matched": 59,
         "rollout/fp_total": 31, "rollout/fn_total": 24, "rollout/parse_dropped_invalid": 2,
         "rollout/parse_dropped_ambiguous": 1, "rollout/parse_truncated_rate": 0.125,
         "rollout/sample_valid_pred_rate": 0.875},
}


def train_row(s: int) -> dict:
    row = {"step": s, "kind": "train", "loss": 10.0 - 0.1 * s, "loss/coord_soft_ce": SOFT_CE[s - 1],
           "loss/coord_gate": 0.5, "coord_diag/coord_tokens": float(TOKENS[s - 1]),
           "coord_diag/expected_bin_mae": 50.0 - s, "learning_rate": 1e-3}
    if s % 2 == 0:  # a metric logged on some steps only (e.g. Channel-A steps)
        row["coord_diag/acc_top5"] = s / 100
    return row


def obj(desc, box, score=None):
    return {"desc": desc, "bbox_2d": box} | ({"score": score} if score is not None else {})


GT0 = [obj("book", [100, 100, 300, 300]), obj("book", [400, 100, 600, 300]),
       obj("chair", [100, 500, 400, 900])]
# emission order: three near-identical books, a chair, a book above it (ordering violation),
# a second chair, a shelf on the first book (same box, other desc: no duplicate; violation)
PRED0 = [obj("book", [100, 100, 300, 300], 0.9), obj("book", [100, 100, 300, 310], 0.8),
         obj("book", [100, 100, 300, 320], 0.7), obj("chair", [100, 500, 400, 900], 0.9),
         obj("book", [400, 100, 600, 300], 0.6), obj("chair", [100, 500, 400, 885], 0.5),
         obj("shelf", [100, 100, 300, 300], 0.4)]
GT1 = [obj("person", [100 * i, 0, 100 * i + 90, 500]) for i in range(5)]


def sample(sid, image, gt, pred, pairs, truncated=False):
    matched, found = {p for p, _ in pairs}, {g for _, g in pairs}
    return {"sample_id": sid, "image": image, "width": 100, "height": 80, "rollout_text": "",
            "gt_objects": gt, "pred_objects": pred,
            "match": {"matched_pairs": pairs,
                      "fn_gt_indices": [j for j in range(len(gt)) if j not in found],
                      "fp_pred_indices": [i for i in range(len(pred)) if i not in matched]},
            "stats": {"parse_invalid_rollout": False, "parse_dropped_invalid": 0,
                      "parse_dropped_ambiguous": 0, "parse_truncated": truncated,
                      "parse_dropped_invalid_by_reason": {}, "valid_pred_objects": len(pred),
                      "gt_objects": len(gt), "matched": len(pairs)}}


def write_dump(run: Path, step: int, samples: list[dict]) -> None:
    (run / "monitor_dumps").mkdir(exist_ok=True)
    dump = {"global_step": step, "metrics": EVAL[step], "samples": samples}
    (run / "monitor_dumps" / f"step_{step:06d}.json").write_text(json.dumps(dump))


def build_run(root: Path, *, evals=True, dumps=True, scale=1.0) -> Path:
    run = root
    run.mkdir(parents=True)
    (run / "run_metadata.json").write_text(json.dumps({
        "created_at": "2026-02-24T13:47:47+00:00", "git": {"sha": "4d2c6d3", "branch": "main",
                                                           "dirty": False},
        "seed": 17, "trainer_variant": "stage2_ab", "packages": {"torch": "2.13.0"},
        "command": ["coordexp", "train", "a_only.yaml"]}))
    config = {"training": {"stage": "stage2_ab", "eval_steps": 10, "max_steps": 20},
              "stage2_ab": {"schedule": {"b_ratio": 0.0}, "n_softctx_iter": 2,
                            "softctx_grad_mode": "unroll", "coord_ctx_embed_mode": "st",
                            "coord_decode_mode": "exp", "bbox_smoothl1_weight": 2.0,
                            "bbox_ciou_weight": 0.2, "coord_ce_weight": 0.0},
              "coord_soft_ce_w1": {"soft_ce_weight": 0.1, "w1_weight": 0.1,
                                   "target_sigma": 2.0, "target_truncate": 8,
                                   "temperature": 1.0},
              "monitor_dump": {"enabled": True, "max_samples": 2}}
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    rows = [train_row(s) for s in STEPS]
    if evals:
        rows.insert(10, {"step": 10, "kind": "eval", **EVAL[10]})
        scaled = {k: v * scale if isinstance(v, float) else v for k, v in EVAL[20].items()}
        rows.append({"step": 20, "kind": "eval", **scaled})
    (run / "logging.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if dumps:
        (run / "img").mkdir()
        Image.new("RGB", (100, 80), (30, 90, 160)).save(run / "img" / "a.png")
        write_dump(run, 10, [sample(0, "img/a.png", GT0, PRED0[:1], [[0, 0]]),
                             sample(1, "img/missing.png", GT1, [], [], truncated=True)])
        write_dump(run, 20, [sample(0, "img/a.png", GT0, PRED0, [[0, 0], [3, 2], [4, 1]]),
                             sample(1, "img/missing.png", GT1, [], [], truncated=True)])
    return run


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("r") / "run_a")
    out = run / "report"
    assert report_command(str(run), out="", window=3,
                          corr=["coord_diag/expected_bin_mae~loss/coord_soft_ce"]) == 0
    return run, out, json.loads((out / "report.json").read_text())


def test_eval_table_holds_every_logged_value(full):
    _, _, rep = full
    assert [r["step"] for r in rep["eval_table"]] == [10, 20]
    for row in rep["eval_table"]:
        assert row == {"step": row["step"], **EVAL[row["step"]]}


def test_eval_trends_in_words(full):
    _, out, rep = full
    t = rep["eval_trends"]
    assert t["rollout/mAP"]["direction"] == "flat"  # +1.7% is within the 3% band
    assert t["rollout/f1"]["direction"] == "rises"
    assert t["rollout/f1"]["delta"] == pytest.approx(0.06)
    assert t["rollout/f1"]["relative"] == pytest.approx(0.10)
    assert t["rollout/fp_total"]["direction"] == "falls"
    md = (out / "report.md").read_text()
    assert "`f1` rises from 0.6000 to 0.6600 (+0.0600, +10.0%), steadily." in md
    assert "`fp_total` falls from 45 to 31 (-14, -31.1%), steadily." in md
    assert "`mAP` is flat" in md


def test_trend_description_of_a_non_monotonic_series():
    t = trend([1.0, 2.0, 1.5])
    assert t["direction"] == "rises" and not t["monotonic"]
    assert describe_trend("x", t) == \
        "x rises from 1.0000 to 1.5000 (+0.5000, +50.0%), not monotonically (range 1.0000..2.0000)."
    assert trend([3.0]) is None and describe_trend("x", None).endswith("no trend.")


SEED_EVAL = [  # the seed note's eval table (steps 300..1500): step, mAP, f1, pred, fp, fn
    (300, 0.3425, 0.6209, 3958, 1594, 1293), (600, 0.3376, 0.6306, 3819, 1462, 1300),
    (900, 0.3429, 0.6316, 3876, 1497, 1278), (1200, 0.3347, 0.6432, 3675, 1317, 1299),
    (1500, 0.3351, 0.6460, 3755, 1361, 1263)]


def test_seed_eval_table_reads_as_the_note_does():
    keys = ("step", "rollout/mAP", "rollout/f1", "rollout/pred_objects", "rollout/fp_total",
            "rollout/fn_total")
    rows = [dict(zip(keys, r, strict=True)) for r in SEED_EVAL]
    trends = table_trends(rows, keys[1:])
    assert describe_trend("f1", trends["rollout/f1"]) == \
        "f1 rises from 0.6209 to 0.6460 (+0.0251, +4.0%), steadily."
    assert trends["rollout/mAP"]["direction"] == "flat"  # "roughly flat" in the note
    assert eval_reading(trends) == ["`f1` rises (+4.0%) while `mAP` is flat (-2.2%)."]


def test_readings_flag_divergence_and_unsharpened_distributions():
    trends = {"rollout/f1": trend([0.6, 0.5]), "rollout/mAP": trend([0.3, 0.4]),
              "rollout/fp_total": trend([100, 150])}
    [text] = eval_reading(trends)
    assert "They diverge" in text and "`fp_total` rises" in text
    diag = {"coord_diag/expected_bin_mae": trend([42.49, 36.66]),
            "coord_diag/p_gt_mean": trend([0.0490, 0.0500])}
    near = [{"coord_diag/coord_vocab_mass_mean": 0.9983},
            {"coord_diag/coord_vocab_mass_mean": 0.9998}]
    assert diagnostics_reading(diag, near) == [
        "The expected coordinate moves closer to the GT bin (`expected_bin_mae` falls (-13.7%)).",
        "The distributions do not get sharper (`p_gt_mean` flat): good for expectation decoding, "
        "a concern for greedy discrete coord tokens.",
        "Coord-vocab mass is 0.9998 at the last step: hardly any probability leaks from coord "
        "slots to text tokens."]


def test_near_step_means_use_the_window_nearest_rows_that_log_the_key(full):
    _, _, rep = full
    near = {r["step"]: r for r in rep["diagnostics_near_eval"]}
    # window 3: steps 9, 10, 11 around 10 (mae 41, 40, 39); 18, 19, 20 around 20
    assert near[10]["coord_diag/expected_bin_mae"] == pytest.approx(40.0)
    assert near[20]["coord_diag/expected_bin_mae"] == pytest.approx(31.0)
    # acc_top5 only on even steps: 8, 10, 12 and 16, 18, 20
    assert near[10]["coord_diag/acc_top5"] == pytest.approx(0.10)
    assert near[20]["coord_diag/acc_top5"] == pytest.approx(0.18)
    assert near[10]["loss/coord_gate"] == 0.5
    assert near[10]["coord_diag/p_gt_mean"] is None  # not logged
    assert rep["diagnostics_trends"]["coord_diag/expected_bin_mae"]["direction"] == "falls"


def test_pearson_r_equals_numpy(full):
    _, _, rep = full
    corr = rep["correlations"]
    expected = np.corrcoef(TOKENS, SOFT_CE)[0, 1]
    assert corr["coord_diag/coord_tokens~loss/coord_soft_ce"] == pytest.approx(expected, abs=1e-12)
    mae = [50.0 - s for s in STEPS]
    assert corr["coord_diag/expected_bin_mae~loss/coord_soft_ce"] == pytest.approx(
        np.corrcoef(mae, SOFT_CE)[0, 1], abs=1e-12)
    assert rep["correlation_rows"]["coord_diag/coord_tokens~loss/coord_soft_ce"] == 20


def test_dump_samples_counts_duplicates_ordering_and_f1(full):
    _, _, rep = full
    assert [d["step"] for d in rep["dumps"]] == [10, 20]
    s0, s1 = rep["dumps"][1]["samples"]
    # book pairs: (0,1) IoU 0.952, (0,2) 0.909, (1,2) 0.955; chairs (3,5) 0.9625; shelf != book
    assert s0 == {"sample_id": 0, "gt_objects": 3, "pred_objects": 7, "matched": 3,
                  "precision": pytest.approx(3 / 7), "recall": 1.0, "f1": pytest.approx(0.6),
                  "near_dup_pairs_iou90": 4, "near_dup_pairs_iou95": 3,
                  "ordering_violations": 2,
                  "pred_class_hist": {"book": 4, "chair": 2, "shelf": 1},
                  "gt_class_hist": {"book": 2, "chair": 1}}
    assert (s1["precision"], s1["recall"], s1["f1"], s1["pred_objects"]) == (0.0, 0.0, 0.0, 0)
    early = rep["dumps"][0]["samples"][0]
    assert (early["precision"], early["recall"], early["f1"]) == pytest.approx((1, 1 / 3, 0.5))
    summary = rep["dumps"][1]["summary"]
    assert summary["mean_pred_objects"] == 3.5 and summary["mean_f1"] == pytest.approx(0.3)
    assert summary["truncated"] == 1 and summary["invalid"] == 0


def test_report_text_names_failure_patterns(full):
    _, out, _ = full
    md = (out / "report.md").read_text()
    assert "4 `book` boxes hold 3 near-duplicate pairs at IoU >= 0.9 (2 at >= 0.95)" in md
    assert "F1 by dump step: 10: 0.5000, 20: 0.6000" in md
    assert "| 1 | person | 5 | 0 | 0 | 5 |" in md  # crowded scene row
    assert "| channel routing (schedule.b_ratio) | stage2_ab.schedule.b_ratio | " \
           "0.0 (Channel-A only) |" in md
    assert "| hard coord CE (coord_ce_weight) | stage2_ab.coord_ce_weight | off (0) |" in md
    assert "1 dumped image(s) unreadable" in md


def markdown_tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def cells(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def assert_valid_markdown(path: Path) -> None:
    tables = markdown_tables(path.read_text())
    assert tables
    for table in tables:
        assert len(table) >= 2
        assert re.fullmatch(r"\| (:?-{3,}:? \| )*:?-{3,}:? \|", table[1]), table[1]
        assert all(line.endswith("|") and cells(line) == cells(table[0]) for line in table)
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text()):
        assert (path.parent / ref).is_file(), ref


def assert_html_images_exist(path: Path) -> list[str]:
    srcs = re.findall(r'<img src="([^"]+)"', path.read_text())
    assert srcs
    for src in srcs:
        assert (path.parent / src).is_file(), src
    return srcs


def test_markdown_tables_valid_and_every_image_exists(full):
    _, out, _ = full
    assert_valid_markdown(out / "report.md")
    srcs = assert_html_images_exist(out / "report.html")
    assert {"eval_metrics.png", "eval_counts.png", "diagnostics.png", "corr_0.png"} <= set(srcs)
    assert sum(s.startswith("overlays/") for s in srcs) == 2


def test_half_written_last_line_is_skipped_and_noted(tmp_path):
    run = build_run(tmp_path / "run", dumps=False)
    with (run / "logging.jsonl").open("a") as f:
        f.write('{"step": 21, "kind": "train", "loss": 9.')
    assert report_command(str(run), window=3) == 0
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["correlation_rows"]["coord_diag/coord_tokens~loss/coord_soft_ce"] == 20
    assert any("line 23 is half-written" in m for m in rep["missing"])
    assert "half-written" in (run / "report" / "report.md").read_text()


def test_broken_line_before_the_last_exits_2(tmp_path, capsys):
    run = build_run(tmp_path / "run", dumps=False)
    lines = (run / "logging.jsonl").read_text().splitlines()
    lines[4] = lines[4][:20]
    (run / "logging.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run)]) == 2
    assert "logging.jsonl:5: not valid JSON" in capsys.readouterr().err


def test_run_without_evals_or_dumps_reports_what_it_has(tmp_path):
    run = build_run(tmp_path / "run", evals=False, dumps=False)
    assert main(["report", str(run), "--window", "3"]) == 0
    out = run / "report"
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_table"] == [] and rep["dumps"] == []
    # diagnostics fall back to the last train step (18, 19, 20)
    assert rep["diagnostics_near_eval"][0]["step"] == 20
    assert rep["diagnostics_near_eval"][0]["coord_diag/expected_bin_mae"] == pytest.approx(31)
    md = (out / "report.md").read_text()
    assert "no eval rows in logging.jsonl" in md and "no monitor dumps" in md
    assert_valid_markdown(out / "report.md")
    assert_html_images_exist(out / "report.html")


@pytest.mark.parametrize("make", ["empty", "absent", "file"])
def test_not_a_run_exits_2_with_a_clear_message(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("hi")
    elif make == "file":
        target.write_text("hi")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err or "no such run directory" in err
    assert "Traceback" not in err


def test_malformed_dump_exits_2_naming_the_file(tmp_path, capsys):
    run = build_run(tmp_path / "run")
    (run / "monitor_dumps" / "step_000020.json").write_text(json.dumps({"global_step": 20}))
    assert main(["report", str(run)]) == 2
    assert "step_000020.json: a monitor dump needs a 'samples' list" in capsys.readouterr().err


def test_bad_corr_spec_exits_2(full, capsys):
    run, _, _ = full
    assert main(["report", str(run), "--corr", "loss"]) == 2
    assert "must name two logged series as A~B" in capsys.readouterr().err


def test_compare_puts_runs_side_by_side(full, tmp_path):
    run_a, _, _ = full
    run_b = build_run(tmp_path / "other" / "run_b", dumps=False, scale=1.1)
    out = tmp_path / "cmp"
    assert main(["report", str(run_a), "--compare", str(run_b), "--out", str(out),
                 "--window", "3"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["runs"] == ["run_a", "run_b"]
    assert rep["reports"]["run_b"]["eval_table"][1]["rollout/f1"] == pytest.approx(0.726)
    md = (out / "report.md").read_text()
    assert f"| f1 | 20 | 0.6600 | {fmt(0.66 * 1.1)} | +{fmt(0.66 * 1.1 - 0.66)} |" in md
    assert "run_b: no monitor dumps" in md
    assert_valid_markdown(out / "report.md")
    assert_html_images_exist(out / "report.html")
    assert (out / "runs" / "run_a" / "report.html").is_file()


CHROMIUM = Path("/usr/bin/chromium")
# Loaded into a copy of the page: records failed loads and script errors, then counts what the
# page shows; --dump-dom prints the body attribute after the load event.
PROBE = """<script>
const broken = [];
window.addEventListener('error', e => broken.push(e.target && e.target.src ?
  'load:' + e.target.getAttribute('src') : 'js:' + e.message), true);
window.addEventListener('load', () => {
  for (const img of document.images)
    if (!(img.complete && img.naturalWidth > 0)) broken.push('img:' + img.getAttribute('src'));
  document.body.setAttribute('data-probe', JSON.stringify({images: document.images.length,
    tables: document.querySelectorAll('table').length, broken: broken}));
});
</script>"""


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args]
    done = subprocess.run([str(CHROMIUM), *flags, url], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
def test_html_opens_in_headless_chromium_and_shows_tables_and_plots(full, tmp_path):
    _, out, _ = full
    page = (out / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", f'<head><base href="{out.resolve().as_uri()}/">'
                                  + PROBE, 1))
    dom = chromium(probe.as_uri(), tmp_path / "p1", "--virtual-time-budget=5000",
                   "--dump-dom").stdout
    found = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert found["broken"] == []
    assert found["images"] == len(re.findall("<img ", page)) >= 6
    assert found["tables"] == len(re.findall("<table>", page)) >= 5
    shot = tmp_path / "shot.png"
    chromium((out / "report.html").resolve().as_uri(), tmp_path / "p2",
             f"--screenshot={shot}", "--window-size=1280,2000")
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1280)
    assert (pixels < 200).mean() > 0.02  # text, table rules and plots, not a blank page
    shutil.copy(shot, out / "screenshot.png")  # beside the report, for a human look


def test_chromium_probe_notices_a_missing_image(full, tmp_path):
    """The probe above can fail: a page whose image is absent reports it."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed")
    page = tmp_path / "broken.html"
    page.write_text(f"<html><head>{PROBE}</head><body><img src='absent.png'></body></html>")
    dom = chromium(page.as_uri(), tmp_path / "p", "--virtual-time-budget=3000",
                   "--dump-dom").stdout
    found = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert "img:absent.png" in found["broken"]
