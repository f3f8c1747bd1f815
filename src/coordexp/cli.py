"""The `coordexp` command line: argument parsing only; every command calls library functions."""

from __future__ import annotations

import argparse
import sys

from coordexp.errors import UserError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coordexp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="score predictions against ground truth (COCO AP + F1)")
    e.add_argument("--gt", required=True, help="ground-truth records JSONL")
    e.add_argument("--pred", required=True, help="predictions JSONL (objects with score, or raw_text)")
    e.add_argument("--out", required=True, help="output folder for metrics.json and per-class files")
    e.set_defaults(run=_cmd_eval)
    return p


def _cmd_eval(args: argparse.Namespace) -> int:
    from coordexp.eval.evaluate import eval_command

    return eval_command(args.gt, args.pred, args.out)


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
