"""Command line: argument parsing and printing only; the work is in onnxprune.api.

Exit codes: 0 success, 1 internal error (a bug: please report), 2 bad input or a model that
cannot be pruned as asked, 4 the rewritten model failed verification (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys

from onnxprune import api
from onnxprune.errors import OnnxpruneError
from onnxprune.modelio import check_output_path, load_model, save_model
from onnxprune.report import human, structure_json, structure_table


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.split(","))
        if any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:D0,D1,... with positive dims, e.g. x:1,336,7") from None
    return name, shape


def _shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]] | None:
    return dict(args.shape) if args.shape else None


def cmd_inspect(args: argparse.Namespace) -> int:
    analysis = api.inspect(load_model(args.model), _shapes(args))
    if args.json:
        print(json.dumps(structure_json(analysis), indent=2))
    else:
        print(structure_table(analysis))
    return 0


def cmd_cut(args: argparse.Namespace) -> int:
    check_output_path(args.input, args.output)
    units = [u for part in args.remove for u in part.split(",") if u.strip()]
    result = api.cut(load_model(args.input), units, _shapes(args))
    save_model(result.model, args.output)
    print(f"removed {len(result.plan.units)} unit(s) from "
          f"{', '.join(n for n, c in result.plan.cuts.items() if not c.empty)}")
    print(f"params {human(result.params_before)} -> {human(result.params_after)}, "
          f"FLOPs {human(result.flops_before)} -> {human(result.flops_after)}")
    print(f"verified {result.verification}")
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune",
        description="Structured pruning of attention and feed-forward blocks in ONNX models.",
        epilog="exit codes: 0 ok, 1 internal error, 2 bad input, 4 verification failed")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    shape_help = "concrete shape for an input with dynamic dims, e.g. x:1,336,7 (repeatable)"

    p = sub.add_parser("inspect", help="list attention and FFN blocks, params and FLOPs")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--json", action="store_true", help="print the structure as JSON")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:DIMS",
                   help=shape_help)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("cut", help="remove named units and write the verified smaller model")
    p.add_argument("input", help="ONNX file to prune")
    p.add_argument("output", help="where to write the pruned model")
    p.add_argument("--remove", action="append", required=True, metavar="UNITS",
                   help="comma-separated units: attn0, attn0.head1, attn0.qk1.3, attn0.vo2.0, "
                        "ffn1, ffn1.ch7 (repeatable)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:DIMS",
                   help=shape_help)
    p.set_defaults(func=cmd_cut)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except OnnxpruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxprune: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
