"""The `coordexp` command line: argument parsing only; every command calls library functions."""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

from coordexp.data.render import FIELD_ORDERS
from coordexp.data.synthetic import PRESETS
from coordexp.errors import UserError
from coordexp.model.tiny import FAMILIES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (and exit code 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


DESCRIPTION = ("Teach vision-language models to detect objects by writing coordinate tokens. "
               "Start with `coordexp demo`.")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="coordexp", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="make or convert datasets")
    d = data.add_subparsers(dest="data_cmd", required=True)
    s = d.add_parser("synth", help="seeded synthetic shapes dataset (train/val JSONL + PNGs)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=_positive_int, required=True, help="number of train images")
    s.add_argument("--val", type=_positive_int, required=True, help="number of val images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=tuple(PRESETS), default="shapes",
                   help="shapes: 1-12 shapes of 6 colours x 4 kinds, 224 px, 15%% crowded; "
                        "crowded: 112 px, 80%% of images hold a shelf of 4-12 same-colour "
                        "squares in 1-3 rows; books: crowded with ragged shelf tops (the "
                        "answer order jumps along a row); dense: 112 px, 12-30 squares, every "
                        "image a shelf of up to 4 rows (the flags below override the preset)")
    s.add_argument("--image-size", type=int, help="square image side in pixels")
    s.add_argument("--min-objects", type=int)
    s.add_argument("--max-objects", type=int)
    s.add_argument("--shapes", help="comma-separated shape kinds")
    s.add_argument("--colours", help="comma-separated colours")
    s.add_argument("--crowded", "--crowded-share", dest="crowded_share", type=float,
                   help="fraction of images with a crowded shelf of small same-class objects")
    s.add_argument("--shelf-rows", type=int, help="most rows of a shelf (1-4)")
    s.add_argument("--shelf-ragged", type=float,
                   help="shelf objects share a bottom line, tops up to this fraction of the "
                        "height lower (0-1; 0 = even tops)")
    s.set_defaults(run=_cmd_synth)

    c = d.add_parser("coco", help="COCO instances JSON -> records JSONL")
    c.add_argument("--instances", required=True, help="COCO instances_*.json")
    c.add_argument("--images", required=True, help="folder the file_name entries are relative to")
    c.add_argument("--out", required=True, help="output records JSONL")
    c.add_argument("--max-objects", type=_positive_int, default=60,
                   help="drop (and count) images with more objects than this")
    c.add_argument("--keep-crowd", action="store_true", help="keep iscrowd annotations")
    c.set_defaults(run=_cmd_coco)

    y = d.add_parser("yolo", help="Ultralytics YOLO dataset (data.yaml, images/, labels/) -> "
                                  "records JSONL")
    y.add_argument("--root", required=True, help="folder holding data.yaml, images/, labels/")
    y.add_argument("--split", default="train", help="the images/<split>, labels/<split> folders")
    y.add_argument("--out", required=True, help="output records JSONL")
    y.set_defaults(run=_cmd_yolo)

    v = d.add_parser("voc", help="Pascal VOC (Annotations/*.xml, JPEGImages/) -> records JSONL")
    v.add_argument("--root", required=True, help="folder holding Annotations/ and JPEGImages/")
    v.add_argument("--image-set", default="",
                   help="convert only the ids in ImageSets/Main/<name>.txt (default: every xml)")
    v.add_argument("--difficult", choices=("keep", "drop"), default="keep",
                   help="keep 'difficult' objects flagged, or drop (and count) them")
    v.add_argument("--out", required=True, help="output records JSONL")
    v.set_defaults(run=_cmd_voc)

    o = d.add_parser("odvg", help="ODVG detection / grounding JSONL -> records JSONL")
    o.add_argument("--input", required=True, help="ODVG JSONL")
    o.add_argument("--images", required=True, help="folder the filename entries are relative to")
    o.add_argument("--label-map", default="",
                   help="JSON {\"0\": name, ...} for instances that give only a 'label'")
    o.add_argument("--out", required=True, help="output records JSONL")
    o.set_defaults(run=_cmd_odvg)

    lv = d.add_parser("lvis", help="LVIS instances JSON -> records JSONL (with federated labels)")
    lv.add_argument("--instances", required=True, help="lvis_v1_*.json")
    lv.add_argument("--images", required=True,
                    help="folder of file_name entries, or the COCO root holding train2017/ and "
                         "val2017/ that coco_url entries point into")
    lv.add_argument("--out", required=True, help="output records JSONL")
    lv.add_argument("--max-objects", type=_positive_int, default=60,
                    help="drop (and count) images with more objects than this")
    lv.set_defaults(run=_cmd_lvis)

    tc = d.add_parser("to-coco", help="records JSONL -> COCO instances JSON (for any scorer)")
    tc.add_argument("--records", required=True, help="records JSONL")
    tc.add_argument("--out", required=True, help="output instances JSON")
    tc.set_defaults(run=_cmd_to_coco)

    model = sub.add_parser("model", help="build or prepare models")
    m = model.add_subparsers(dest="model_cmd", required=True)
    t = m.add_parser("init-tiny", help="a tiny random VLM + offline tokenizer with coord tokens")
    t.add_argument("--out", required=True)
    t.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run=_cmd_init_tiny)
    a = m.add_parser("add-coord-tokens", help="add the 1000 coord tokens to an HF VLM checkpoint")
    a.add_argument("--src", required=True)
    a.add_argument("--dst", required=True)
    a.set_defaults(run=_cmd_add_coord_tokens)
    mg = m.add_parser("merge", help="adapter checkpoint (LoRA/DoRA + coord rows) -> plain HF "
                                    "model directory")
    mg.add_argument("--src", required=True, help="adapter checkpoint directory")
    mg.add_argument("--dst", required=True, help="output model directory")
    mg.set_defaults(run=_cmd_merge)

    i = sub.add_parser("infer", help="images or records -> predictions JSONL (boxes, labels, "
                                     "scores); resumable, and sharded under torchrun")
    i.add_argument("--model", required=True,
                   help="model directory, training checkpoint, or run directory (its latest)")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="records JSONL (objects are ignored)")
    src.add_argument("--images", help="folder of images, or a glob such as 'photos/**/*.jpg'")
    i.add_argument("--out", required=True, help="predictions JSONL to write")
    i.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    i.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 on a GPU that supports it, else fp32")
    i.add_argument("--attn", default="sdpa",
                   help="attention: sdpa | flash_attention_2 (needs flash-attn) | eager")
    i.add_argument("--batch-size", type=_positive_int, default=8,
                   help="images per generate call (batched by similar size)")
    i.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="answer budget per image (default 3084, the seed's evaluation budget); "
                        "answers cut by it are counted and reported")
    i.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="HF repetition penalty (rollout.repetition_penalty): divides the "
                        "logit of every token already in the sequence, prompt, JSON "
                        "punctuation and coord tokens included (1.0 = off)")
    i.add_argument("--constrained", action="store_true",
                   help="CoordJSON grammar: coord slots emit only coord tokens")
    i.add_argument("--field-order", choices=FIELD_ORDERS, default="desc_first",
                   help="the object field order the model was trained with (data.field_order)")
    i.add_argument("--resume", action="store_true",
                   help="continue an interrupted run on the same --out (skips lines written)")
    i.set_defaults(run=_cmd_infer)

    ex = sub.add_parser("export", help="convert predictions to other formats")
    exs = ex.add_subparsers(dest="export_cmd", required=True, parser_class=_Parser)
    cr = exs.add_parser("coco-results", help="predictions JSONL -> COCO results JSON")
    cr.add_argument("--pred", required=True, help="predictions JSONL")
    cr.add_argument("--gt", required=True, help="COCO instances JSON (images matched by file name)")
    cr.add_argument("--out", required=True, help="results JSON to write")
    cr.add_argument("--semantic", action="store_true",
                    help="map a label that is no category name to the nearest one with the "
                         "sentence encoder (as `coordexp eval --semantic on`)")
    cr.set_defaults(run=_cmd_export_coco)

    v = sub.add_parser("visualize", help="draw predicted (and GT) boxes + an index.html gallery")
    v.add_argument("--pred", required=True, help="predictions JSONL")
    v.add_argument("--gt", default=None, help="ground-truth records JSONL (drawn dashed; the "
                                               "gallery is then sorted worst F1 first)")
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--image-root", default=None,
                   help="folder the image paths are relative to (default: the --gt file's "
                        "folder, else the --pred file's)")
    v.add_argument("--min-score", type=_unit_interval, default=0.0,
                   help="draw only predicted boxes with at least this score")
    v.set_defaults(run=_cmd_visualize)

    tr = sub.add_parser("train", help="Stage 1 or Stage 2 AB, as the config says")
    tr.add_argument("config", help="YAML config (may `extends:` others)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=50")
    tr.add_argument("--resume", default="", help="checkpoint dir, or 'latest' in the run dir")
    tr.set_defaults(run=_cmd_train)

    dm = sub.add_parser("demo", help="synthetic data + tiny VLM: Stage 1, then Stage 2 AB and its "
                        "equal-time control, eval, report")
    dm.add_argument("--out", default="demo_run", help="output folder")
    dm.add_argument("--minutes", type=_finite_float, default=10.0, help="training time budget")
    dm.set_defaults(run=_cmd_demo)

    st = sub.add_parser("study", help="equal-budget arms from one checkpoint over seeds: a table "
                        "of paired differences with bootstrap intervals against the control")
    st.add_argument("spec", help="study YAML (see studies/seed_note.yaml)")
    st.add_argument("--out", default="", help="study folder (default: the spec's output_dir)")
    st.set_defaults(run=_cmd_study)

    rp = sub.add_parser("report", help="turn a run directory into report.md / report.html")
    rp.add_argument("run_dir", nargs="?", help="run directory")
    rp.add_argument("--out", default="", help="output folder (default: RUN_DIR/report)")
    rp.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                    help="several run directories side by side")
    rp.add_argument("--window", type=_positive_int, default=10,
                    help="train rows around each eval step averaged for the diagnostics table")
    rp.add_argument("--corr", action="append", default=[], metavar="A~B",
                    help="extra Pearson correlation between two logged series")
    rp.set_defaults(run=_cmd_report)

    e = sub.add_parser("eval", help="score predictions against ground truth (COCO AP + F1)")
    e.add_argument("--gt", required=True, help="ground-truth records JSONL")
    e.add_argument("--pred", required=True,
                   help="predictions JSONL (objects with score, or raw_text)")
    e.add_argument("--out", required=True,
                   help="output folder for metrics.json and per-class files")
    e.add_argument("--semantic", choices=("auto", "on", "off"), default="auto",
                   help="map a desc that is not a category name to the nearest one with a "
                        "sentence encoder (auto: when it is installed)")
    e.add_argument("--semantic-threshold", type=_unit_interval, default=None,
                   help="lowest cosine similarity that maps a desc (default 0.6)")
    e.add_argument("--constant-score", type=_finite_float, default=None,
                   help="give every box this score (AP then follows emission order)")
    e.add_argument("--iou-gate", type=_unit_interval, default=0.3,
                   help="least IoU of a matched pair for precision/recall/F1 (default 0.3)")
    e.add_argument("--field-order", choices=FIELD_ORDERS, default="desc_first",
                   help="object field order, for predictions given as raw_text")
    e.add_argument("--max-preds-per-image", type=_positive_int, default=1000,
                   help="keep this many highest-scoring objects per image; the rest are "
                        "dropped and counted (pred_over_cap_dropped)")
    e.set_defaults(run=_cmd_eval)
    return p


def _cmd_synth(args: argparse.Namespace) -> int:
    import dataclasses

    from coordexp.data.synthetic import synthesize
    from coordexp.files import check_output_dir

    check_output_dir(args.out, "--out")

    given = {k: getattr(args, k) for k in ("image_size", "min_objects", "max_objects",
                                           "crowded_share", "shelf_rows", "shelf_ragged")}
    given |= {k: tuple(getattr(args, k).split(",")) for k in ("shapes", "colours")
              if getattr(args, k) is not None}
    spec = dataclasses.replace(PRESETS[args.preset],
                               **{k: v for k, v in given.items() if v is not None})
    counts = synthesize(args.out, args.train, args.val, args.seed, spec)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")
    return 0


def _cmd_coco(args: argparse.Namespace) -> int:
    from coordexp.data.coco import coco_to_records, load_json

    out = _out_path(args.out)
    records, skipped = coco_to_records(load_json(args.instances), Path(args.images), out.parent,
                                       max_objects=args.max_objects, keep_crowd=args.keep_crowd,
                                       source=args.instances)
    return _write_converted(out, records, skipped)


def _cmd_yolo(args: argparse.Namespace) -> int:
    from coordexp.data.yolo import yolo_to_records

    out = _out_path(args.out)
    return _write_converted(out, *yolo_to_records(Path(args.root), args.split, out.parent))


def _cmd_voc(args: argparse.Namespace) -> int:
    from coordexp.data.voc import voc_to_records

    out = _out_path(args.out)
    return _write_converted(out, *voc_to_records(Path(args.root), out.parent,
                                                 difficult=args.difficult,
                                                 image_set=args.image_set))


def _cmd_odvg(args: argparse.Namespace) -> int:
    from coordexp.data.odvg import odvg_to_records, read_label_map

    out = _out_path(args.out)
    label_map = read_label_map(Path(args.label_map)) if args.label_map else None
    return _write_converted(out, *odvg_to_records(Path(args.input), Path(args.images),
                                                  out.parent, label_map=label_map))


def _cmd_lvis(args: argparse.Namespace) -> int:
    from coordexp.data.coco import load_json
    from coordexp.data.lvis import lvis_to_records

    out = _out_path(args.out)
    return _write_converted(out, *lvis_to_records(load_json(args.instances), Path(args.images),
                                                  out.parent, max_objects=args.max_objects,
                                                  source=args.instances))


def _cmd_to_coco(args: argparse.Namespace) -> int:
    import json

    from coordexp.data.coco import records_to_coco
    from coordexp.data.records import read_records

    records = read_records(args.records, check_images=False)
    coco = records_to_coco(records)
    out = _out_path(args.out)
    out.write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {len(coco['images'])} images, {len(coco['annotations'])} boxes and "
          f"{len(coco['categories'])} categories to {out} (file_name is relative to "
          f"{Path(args.records).parent})")
    return 0


def _out_path(text: str) -> Path:
    """--out of a converter, checked before any work (its folder is made when written)."""
    from coordexp.files import check_output_file

    return check_output_file(text, "--out")


def _write_converted(out: Path, records: list, skipped: Counter) -> int:
    """Write converted records; print how many, and what was skipped and why."""
    from coordexp.data.records import write_records

    write_records(out, records)
    notes = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(skipped.items()))
    print(f"wrote {len(records)} records to {out}" + (f"; skipped {notes}" if notes else ""))
    return 0


def _cmd_init_tiny(args: argparse.Namespace) -> int:
    from coordexp.files import check_output_dir
    from coordexp.model.qwen_vl import build_processor, save_vlm
    from coordexp.model.tiny import TinySpec, build_tiny_model, build_tiny_tokenizer

    check_output_dir(args.out, "--out")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, TinySpec(family=args.family), seed=args.seed)
    save_vlm(model, build_processor(args.family, tok), args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a tiny {args.family} ({n / 1e6:.2f}M parameters, vocab {len(tok)}) to {args.out}")
    return 0


def _cmd_add_coord_tokens(args: argparse.Namespace) -> int:
    from coordexp.files import check_output_dir
    from coordexp.model.qwen_vl import load_vlm, save_vlm
    from coordexp.model.tokenizer import add_coord_tokens, resize_for_tokenizer

    check_output_dir(args.dst, "--dst")
    model, processor, family = load_vlm(args.src)
    before = len(processor.tokenizer)
    add_coord_tokens(processor.tokenizer)
    resize_for_tokenizer(model, processor.tokenizer)
    save_vlm(model, processor, args.dst)
    print(f"{family}: vocabulary {before} -> {len(processor.tokenizer)}; saved to {args.dst}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from coordexp.model.qwen_vl import load_vlm, save_vlm
    from coordexp.model.tuning import ADAPTER_CONFIG

    if not (Path(args.src) / ADAPTER_CONFIG).is_file():
        raise UserError(f"{args.src}: not an adapter checkpoint (no {ADAPTER_CONFIG})")
    model, processor, family = load_vlm(args.src)
    save_vlm(model, processor, args.dst)
    print(f"{family}: merged {args.src} into a plain model directory {args.dst}")
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from coordexp.infer import InferOptions, infer_command

    budget = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    opts = InferOptions(device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                        batch_size=args.batch_size, repetition_penalty=args.repetition_penalty,
                        constrained=args.constrained, field_order=args.field_order,
                        resume=args.resume, **budget)
    return infer_command(args.model, args.out, data=args.data, images=args.images, opts=opts)


def _cmd_export_coco(args: argparse.Namespace) -> int:
    from coordexp.export import export_coco_results
    from coordexp.files import check_output_file

    check_output_file(args.out, "--out")
    return export_coco_results(args.pred, args.gt, args.out, semantic=args.semantic)


def _cmd_visualize(args: argparse.Namespace) -> int:
    from coordexp.files import check_output_dir
    from coordexp.visualize import visualize_command

    check_output_dir(args.out, "--out")
    return visualize_command(args.pred, args.out, gt=args.gt, image_root=args.image_root,
                             min_score=args.min_score)


def _cmd_train(args: argparse.Namespace) -> int:
    from coordexp.train.loop import train_command

    return train_command(args.config, args.overrides, resume=args.resume)


def _cmd_demo(args: argparse.Namespace) -> int:
    from coordexp.demo import run_demo
    from coordexp.files import check_output_dir

    check_output_dir(args.out, "--out")
    return run_demo(args.out, minutes=args.minutes)


def _cmd_study(args: argparse.Namespace) -> int:
    from coordexp.study import study_command

    return study_command(args.spec, output_dir=args.out)


def _cmd_report(args: argparse.Namespace) -> int:
    from coordexp.report import report_command

    return report_command(args.run_dir, out=args.out, compare=args.compare, window=args.window,
                          corr=args.corr)


def _cmd_eval(args: argparse.Namespace) -> int:
    from coordexp.eval.evaluate import eval_command

    opts = {"semantic": {"auto": None, "on": True, "off": False}[args.semantic],
            "constant_score": args.constant_score, "iou_gate": args.iou_gate,
            "field_order": args.field_order,
            "max_preds_per_image": args.max_preds_per_image}
    if args.semantic_threshold is not None:
        opts["semantic_threshold"] = args.semantic_threshold
    return eval_command(args.gt, args.pred, args.out, **opts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as e:
        print(f"coordexp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coordexp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
