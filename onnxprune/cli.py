"""Command line: argument parsing and printing only; the work is in onnxprune.api.

    onnxprune IN.onnx OUT.onnx --ratio 0.5 [options]     the main job (= onnxprune prune ...)
    onnxprune score MODEL [--json] [--plot FILE.png]     every unit's score, nothing cut
    onnxprune inspect MODEL | onnxprune cut IN OUT --remove UNITS
    onnxprune eval MODEL --data FILE [--json]           metrics on a labelled dataset
    onnxprune bench MODEL [MODEL ...] [--json FILE]      latency, size, FLOPs, memory

Every command takes --json [FILE|-] (JSON on stdout, the human text then on stderr; or to
FILE) and --config FILE.toml (options from a file; flags given on the command line win).

Exit codes: 0 success, 1 internal error (a bug: please report), 2 bad input or a model that
cannot be pruned as asked, 3 the quality gate (--max-drop) failed: report written, model
not, 4 the rewritten model failed verification (nothing written), 130/143 interrupted
(Ctrl-C/SIGTERM), 141 stdout closed early (| head; nothing written). Bad input is one line,
"onnxprune: error: ...", never a traceback; argument errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from onnxprune import api
from onnxprune.config import apply_config
from onnxprune.errors import OnnxpruneError
from onnxprune.modelio import load_model, save_model
from onnxprune.outputs import RunFiles, Terminated, sigterm_as_interrupt, transaction
from onnxprune.pipeline import Report
from onnxprune.progress import ProgressBar, stage_done
from onnxprune.report import (
    human,
    plot_scores,
    prune_summary,
    scores_json,
    scores_table,
    structure_json,
    structure_table,
    write_json,
)
from onnxprune.scores import granularities, score_names
from onnxprune.weightstore import stores_closed_after

COMMANDS = ("inspect", "cut", "prune", "score", "finetune", "eval", "bench")
EXIT_QUALITY_GATE = 3
# the reader of stdout went away (| head): 128 + SIGPIPE, what a shell reports for any tool
# a closed pipe stops; nothing more is printed and, as on any failure, nothing is written
EXIT_BROKEN_PIPE = 141

def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.split(","))
        if any(d < 0 for d in shape):   # 0: an empty key/value cache (past length 0)
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:D0,D1,... with dims >= 0, e.g. x:1,336,7") from None
    return name, shape


def _shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]] | None:
    return dict(args.shape) if args.shape else None


# --- machine-readable output: --json [FILE|-] on every command (issue 15) ----------------
def add_json_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help=f"{what} as JSON: on stdout with no value or '-' (the human text then "
                        "goes to stderr, so stdout is pure JSON), or written to FILE "
                        "(atomically)")


def emit_json(args: argparse.Namespace, data: dict, path: str | None = None,
              say: bool = True) -> None:
    """The command's JSON: on the real stdout for ``--json``/``--json -``, else written to
    the file (``path``, default ``--json FILE``). NaN and inf (a diverged loss) are written
    as null: JSON has no such numbers, and a strict reader (jq) refuses them."""
    path = path or args.json
    data = json_safe(data)
    if path == "-":
        out = getattr(args, "stdout", None) or sys.stdout
        out.write(json.dumps(data, indent=2) + "\n")
        out.flush()
    else:
        write_json(path, data)
        if say:
            print(f"wrote {path}")


def json_safe(value):
    """``value`` with every non-finite float replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def run_command(args: argparse.Namespace) -> int:
    """Run the command; with its JSON on stdout, every human line goes to stderr. The
    weight stores it made are closed at its end (it has written what it writes)."""
    with stores_closed_after():
        if getattr(args, "json", None) != "-":
            return args.func(args)
        args.stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
def json_flag_before_model(argv: list[str]) -> list[str]:
    """``--json`` as a flag before the model path of inspect, score and eval (``inspect
    --json m.onnx``, as it was used when their --json took no value) means stdout. Other
    commands took no such flag: there ``--json m.onnx`` stays a path (refused as an input)."""
    out = list(argv)
    if not out or out[0] not in ("inspect", "score", "eval"):
        return out
    for i, token in enumerate(out[:-1]):
        if token == "--":
            break
        if token == "--json" and out[i + 1].lower().endswith(".onnx"):
            out[i] = "--json=-"
    return out
# --- end of --json --------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    RunFiles.from_args(args).check()
    analysis = api.inspect(load_model(args.model, share=True), _shapes(args))
    if args.json != "-":
        print(structure_table(analysis))
    if args.json:
        emit_json(args, structure_json(analysis))
    return 0


def cmd_cut(args: argparse.Namespace) -> int:
    files = RunFiles.from_args(args)
    files.check()
    units = [u for part in args.remove for u in part.split(",") if u.strip()]
    result = api.cut(load_model(args.input, share=True), units, _shapes(args), rtol=args.rtol,
                     atol=args.atol, stored=True)
    save_model(result.model, args.output, external=Path(args.input) in files.external)
    print(f"removed {len(result.plan.units)} unit(s) from "
          f"{', '.join(n for n, c in result.plan.cuts.items() if not c.empty)}")
    print(f"params {human(result.params_before)} -> {human(result.params_after)}, "
          f"FLOPs {human(result.flops_before)} -> {human(result.flops_after)}")
    print(f"verified {result.verification}")
    print(f"wrote {args.output}")
    if args.json:
        emit_json(args, cut_json(args, result))
    return 0


def cut_json(args: argparse.Namespace, result) -> dict:
    return {"input": args.input, "output": args.output,
            "removed": [u.name for u in result.plan.units],
            "blocks": [n for n, c in result.plan.cuts.items() if not c.empty],
            "params": {"before": result.params_before, "after": result.params_after},
            "flops": {"before": result.flops_before, "after": result.flops_after},
            "verified": result.verification.to_json()}


def cmd_prune(args: argparse.Namespace) -> int:
    files = RunFiles.from_args(args)
    files.check()
    if args.max_drop is not None and args.max_drop < 0:
        raise OnnxpruneError(f"--max-drop {args.max_drop}: must be >= 0")
    progress = ProgressBar(args.quiet)
    common = dict(method=args.method, granularity=args.granularity, samples=args.samples,
                  target=args.target, steps=args.steps, round_to=args.round_to, ema=args.ema,
                  seed=args.seed, loss=args.loss, batch_size=args.batch_size,
                  threads=args.threads, shapes=_shapes(args), progress=progress,
                  keep=_names(args.keep), rtol=args.rtol, atol=args.atol,
                  workers=args.workers, ray_address=args.ray_address)
    if args.ft_schedule == "during":
        pruned, report, interleaved = _prune_during(args, common)
    else:
        pruned, report = api.prune(args.input, args.ratio, args.calib,
                                   reconstruct=args.reconstruct, stored=True, **common,
                                   **_latency_options(args))
    print(prune_summary(report))
    if report.latency:
        print(latency_line(report.latency))
    extra = {}
    if args.ft_schedule == "during":
        extra = {"finetune": interleaved.to_json()}
    elif args.ft_epochs or args.ft_steps:
        pruned, report, extra = _recover(args, load_model(args.input), pruned, report)
    gate = api.quality_gate(args.input, pruned, report, args.max_drop, args.val,
                            batch_size=args.batch_size, seed=args.seed, shapes=_shapes(args),
                            threads=args.threads)
    gate_failed = gate is not None and not gate["passed"]
    if gate is not None and gate["data"]["kind"] == "val":
        print(gate_line(gate))
    if not gate_failed:   # the model first, the report last (main removes both on failure)
        since = time.perf_counter()
        save_model(pruned, args.output, external=Path(args.input) in files.external)
        stage_done(progress, "write", since)
    if args.json or args.report:   # both given: the same report on stdout and in the file
        payload = prune_report_json(args, report, extra, not gate_failed)
        for path in dict.fromkeys(p for p in (args.report, args.json) if p):
            emit_json(args, payload, path=path, say=False)
    if gate_failed:
        if report_file(args):
            print(f"wrote report {report_file(args)}")
        print(f"onnxprune: quality gate failed: {gate['metric']} dropped "
              f"{gate['drop']:.2%} > --max-drop {args.max_drop:.2%} on the {gate['data']['kind']} "
              "data; model not written", file=sys.stderr)
        return EXIT_QUALITY_GATE
    print(f"wrote {args.output}")
    if report_file(args):
        print(f"wrote report {report_file(args)}")
    return 0


def report_file(args: argparse.Namespace) -> str | None:
    """The file the prune report goes to (--report FILE or --json FILE), if any."""
    return next((p for p in (args.report, args.json) if p and p != "-"), None)


def _names(values: list[str] | None) -> tuple[str, ...]:
    """Comma-separated names from a repeatable option."""
    return tuple(n.strip() for part in values or () for n in part.split(",") if n.strip())


def file_sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gate_line(gate: dict) -> str:
    return (f"quality gate on {gate['data']['source']} ({gate['data']['kind']}, "
            f"{gate['data']['samples']} samples): {gate['metric']} {gate['before']:.4g} -> "
            f"{gate['after']:.4g}, drop {gate['drop']:+.2%} (max {gate['max_drop']:.2%}): "
            f"{'passed' if gate['passed'] else 'failed'}")


def prune_report_json(args: argparse.Namespace, report: Report, extra: dict,
                      written: bool) -> dict:
    """The prune report (onnxprune/schemas/prune_report.schema.json): the run's report, the
    files with their sha256, and the fine-tuning where there was one."""
    output = {"path": args.output, "sha256": file_sha256(args.output)} if written else None
    return {**report.to_json(), **extra, "input": args.input,
            "output": args.output if written else None,
            "files": {"input": {"path": args.input, "sha256": file_sha256(args.input)},
                      "output": output}}


# --- --target latency (issue 14.5) --------------------------------------------------------
def _latency_options(args: argparse.Namespace) -> dict:
    """The latency budget's options, only where given (the API's defaults otherwise)."""
    given = {"speedup": args.speedup, "latency_ms": args.latency_ms,
             "latency_batch": args.latency_batch, "latency_provider": args.latency_provider}
    return {k: v for k, v in given.items() if v is not None}


def latency_line(latency: dict) -> str:
    measured = latency["measured"]
    return (f"latency {measured['before_ms']:.3f} -> {measured['after_ms']:.3f} ms: "
            f"{measured['speedup']:.3f}x measured, {latency['requested_speedup']:.3f}x "
            f"requested ({latency['error']:+.1%}; table {latency['table']['source']}, "
            f"{len(latency['attempts'])} plan(s))")


def add_latency_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency budget (--target latency)")
    g.add_argument("--speedup", type=finite(), metavar="S",
                   help="with --target latency: make the model S times faster (S > 1), "
                        "measured in ONNX Runtime; replaces --ratio")
    g.add_argument("--latency-ms", type=finite(), metavar="M",
                   help="with --target latency: make the model run in M milliseconds; "
                        "replaces --ratio")
    g.add_argument("--latency-batch", type=count(1), metavar="B",
                   help="batch size latency is measured at (default 1); threads are "
                        "--threads")
    g.add_argument("--latency-provider", choices=["cpu", "cuda", "auto"],
                   help="ONNX Runtime provider latency is measured on (default cpu)")
# --- end of --target latency ----------------------------------------------------------------


def _finetune_options(args: argparse.Namespace, prefix: str = "") -> dict:
    get = lambda name: getattr(args, prefix + name)  # noqa: E731
    return {"epochs": get("epochs"), "steps": get("steps"), "lr": get("lr"),
            "batch_size": args.ft_batch_size if prefix else args.batch_size,
            "weight_decay": get("weight_decay"), "patience": get("patience"),
            "seed": args.seed, "threads": args.threads}


def _print_finetune(result) -> None:
    first = result.train_loss[0] if result.train_loss else float("nan")
    last = result.train_loss[-1] if result.train_loss else float("nan")
    print(f"fine-tuned {result.trainable:,} weights for {result.steps} steps in "
          f"{result.seconds:.1f} s: train loss {first:.4g} -> {last:.4g}")
    if result.val_loss:
        print(f"validation loss {result.val_loss[0][1]:.4g} -> best "
              f"{min(v for _, v in result.val_loss):.4g} (step {result.best_step})")
    if result.stopped:
        print(f"note: {result.stopped}")


def cmd_finetune(args: argparse.Namespace) -> int:
    files = RunFiles.from_args(args)
    files.check()
    model = load_model(args.input)
    result = api.finetune(model, args.train, args.val, trainable=args.train_only,
                          progress=ProgressBar(args.quiet), **_finetune_options(args))
    _print_finetune(result)
    save_model(result.model, args.output, external=Path(args.input) in files.external)
    print(f"wrote {args.output}")
    if args.json:
        emit_json(args, {"input": args.input, "output": args.output, "train": args.train,
                         "val": args.val, **finetune_json(result)})
    return 0


def finetune_json(result) -> dict:
    return {"steps": result.steps, "best_step": result.best_step,
            "seconds": round(result.seconds, 2), "trainable": result.trainable,
            "train_loss_first": result.train_loss[:1],
            "train_loss_last": result.train_loss[-1:],
            "val_loss": result.val_loss, "stopped": result.stopped}


def add_finetune_options(p: argparse.ArgumentParser, prefix: str = "", dest: str = "") -> None:
    g = p.add_argument_group("fine-tuning" if not prefix else "recovery fine-tuning")
    budget = g.add_mutually_exclusive_group(required=not prefix)
    budget.add_argument(f"--{prefix}epochs", dest=f"{dest}epochs", type=count(1), metavar="E",
                        help="passes over the training data")
    budget.add_argument(f"--{prefix}steps", dest=f"{dest}steps", type=count(1), metavar="S",
                        help="optimizer steps")
    g.add_argument(f"--{prefix}lr", dest=f"{dest}lr", type=finite(), default=1e-4,
                   help="peak learning rate (AdamW, warm-up then cosine; default 1e-4)")
    g.add_argument(f"--{prefix}weight-decay", dest=f"{dest}weight_decay", type=finite(0),
                   default=0.01)
    g.add_argument(f"--{prefix}patience", dest=f"{dest}patience", type=count(0), default=3,
                   help="validations without improvement before stopping (default 3)")


def _prune_during(args: argparse.Namespace, common: dict):
    """--finetune-schedule during: prune steps interleaved with the fine-tuning steps."""
    if not args.ft_steps:
        raise OnnxpruneError("--finetune-schedule during needs --finetune-steps S")
    if not args.train:
        raise OnnxpruneError("--finetune-schedule during needs --train FILE (it also "
                             "scores on it)")
    if args.calib:
        raise OnnxpruneError("--finetune-schedule during scores on --train: drop --calib")
    if args.target == "latency":
        raise OnnxpruneError("--finetune-schedule during takes --ratio, not --target latency")
    if args.finetune_only != "all":
        raise OnnxpruneError("--finetune-schedule during trains every weight: drop "
                             "--finetune-only")
    tune = _finetune_options(args, "ft_")
    tune.pop("steps"), tune.pop("epochs"), tune.pop("seed"), tune.pop("threads")
    pruned, report, run = api.prune_while_finetuning(
        load_model(args.input), args.ratio, args.train, args.val, finetune_steps=args.ft_steps,
        finetune_options=tune, **common)
    _print_finetune(run.final)
    report.loss_after, report.quality_after = report.calibration.evaluate(pruned)
    return pruned, report, run


def _recover(args: argparse.Namespace, original, pruned, report: Report):
    """The main job's optional fine-tuning after the cut; the metric is re-measured."""
    if not args.train:
        raise OnnxpruneError("--finetune-epochs/--finetune-steps need --train FILE")
    names = api.changed_weights(original, pruned) if args.finetune_only == "pruned" else ()
    trainable = "blocks" if args.finetune_only == "pruned" else args.finetune_only
    result = api.finetune(pruned, args.train, args.val, trainable=trainable, names=names,
                          progress=ProgressBar(args.quiet),
                          **_finetune_options(args, "ft_"))
    _print_finetune(result)
    before = report.quality_after
    report.loss_after, report.quality_after = report.calibration.evaluate(result.model)
    print(f"{before.name} on the calibration data after fine-tuning: {before.value:.4g} -> "
          f"{report.quality_after.value:.4g} (drop from the original {report.drop:+.2%})")
    extra = {"finetune": {"steps": result.steps, "best_step": result.best_step,
                          "seconds": round(result.seconds, 2), "trainable": result.trainable,
                          "train_loss_first": result.train_loss[:1],
                          "train_loss_last": result.train_loss[-1:],
                          "val_loss": result.val_loss, "stopped": result.stopped,
                          "metric_before_finetune": before.value}}
    return result.model, report, extra


def cmd_score(args: argparse.Namespace) -> int:
    RunFiles.from_args(args).check()
    scores = api.score(load_model(args.model, share=True), args.calib, method=args.method,
                       granularity=args.granularity, samples=args.samples,
                       batch_size=args.batch_size, loss=args.loss, ema=args.ema,
                       seed=args.seed, shapes=_shapes(args), threads=args.threads,
                       progress=ProgressBar(args.quiet), workers=args.workers,
                       ray_address=args.ray_address)
    if args.plot:
        plot_scores(scores, args.plot)
    if args.json != "-":
        print(scores_table(scores))
    if args.json:
        emit_json(args, scores_json(scores))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def count(least: int):
    """An argparse type: an integer of at least ``least`` (--threads 0 = all, -1 refused)."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {least}")
        return value
    return integer


def finite(least: float | None = None):
    """An argparse type: a finite number (nan and inf refused), of at least ``least``;
    other ranges are the API's to check."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
        if least is not None and value < least:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {least:g}")
        return value
    return number


def parse_counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
        if not values or any(v < 1 for v in values):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected positive integers separated by commas, e.g. 1,8") from None
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    RunFiles.from_args(args).check()
    result = api.evaluate(args.model, args.data, metric=args.metric,
                          batch_size=args.batch_size, samples=args.samples, seed=args.seed,
                          shapes=_shapes(args), threads=args.threads)
    if args.json == "-":
        emit_json(args, result)
        return 0
    split = " (test split)" if str(args.data).lower().endswith(".csv") else ""
    width = max(len("model"), *(len(name) for name in result["metrics"]))
    print(f"{'model':<{width}}  {result['model']}")
    print(f"{'data':<{width}}  {result['data']}{split}, {result['samples']} samples")
    for name, value in result["metrics"].items():
        print(f"{name:<{width}}  {value:.4f}")
    print(f"{result['seconds']:.1f} s")
    if args.json:
        emit_json(args, result)
    return 0


def _bench_table(rows) -> str:
    from onnxprune.bench import short_names

    names = dict(zip(dict.fromkeys(r.model for r in rows),
                     short_names(list(dict.fromkeys(r.model for r in rows)))))
    width = max(len("model"), *(len(n) for n in names.values()))
    head = (f"{'model':<{width}} {'batch':>5} {'thr':>3} {'p50 ms':>8} {'p90 ms':>8} "
            f"{'p99 ms':>8} {'mean ms':>8} {'samples/s':>10} {'size MB':>8} {'params':>8} "
            f"{'FLOPs':>8} {'peak MB':>8} {'+model':>7} {'speed-up':>8} {'size':>6} "
            f"{'FLOPs':>6}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{names[r.model]:<{width}} {r.batch:>5} {r.threads:>3} {r.latency_p50_ms:>8.3f} "
            f"{r.latency_p90_ms:>8.3f} {r.latency_p99_ms:>8.3f} {r.latency_mean_ms:>8.3f} "
            f"{r.throughput:>10.1f} {r.file_bytes / 1e6:>8.2f} {human(r.params):>8} "
            f"{human(r.flops):>8} {r.peak_rss_mb:>8.1f} {r.model_rss_mb:>7.1f} "
            f"{r.speedup:>7.2f}x {r.size_ratio:>6.3f} {r.flops_ratio:>6.3f}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from onnxprune.bench import check_plot, plot_bench

    RunFiles.from_args(args).check()
    if args.plot:
        check_plot()
    say = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    rows = api.bench(args.models, args.batch, args.threads, args.provider, args.warmup,
                     args.runs, shapes=_shapes(args), memory=not args.no_memory, progress=say)
    print(f"{rows[0].provider}, {rows[0].warmup} warm-up + {rows[0].runs} timed runs per "
          f"model, interleaved; ratios against {rows[0].model}")
    print(_bench_table(rows))
    if args.json:
        from onnxprune.bench import rows_json

        emit_json(args, rows_json(rows))
    if args.plot:
        plot_bench(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_scoring_options(p: argparse.ArgumentParser, shape_help: str) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--calib", metavar="FILE",
                   help="calibration data: .npz keyed by input (and output) names, .npy "
                        "(single input) or a time-series .csv; default: synthetic inputs "
                        "and self-distillation (data-free)")
    g.add_argument("--samples", type=count(1), metavar="N",
                   help="calibration samples to use (seeded subset; default all, or 64 "
                        "synthetic)")
    g.add_argument("--batch-size", type=count(1), default=32, metavar="B")
    g.add_argument("--method", default="fisher", choices=score_names(),
                   help="sensitivity metric (default fisher)")
    g.add_argument("--granularity", default="auto", choices=granularities(),
                   help="units to prune: module (whole attention, SPAT), head, channel "
                        "(per-head QK/VO), ffn (FFN channels), auto (heads, modules, FFN "
                        "channels ranked together; default)")
    g.add_argument("--loss", choices=["mse", "mae", "ce"],
                   help="task loss with targets (default: inferred); without targets "
                        "self-distillation is used")
    g.add_argument("--ema", type=finite(), default=0.5,
                   help="fisher: EMA factor across progressive steps (--prune-steps; default "
                        "0.5); within a step the score is a mean over every calibration sample")
    g.add_argument("--seed", type=count(0), default=0, help="seed for sampling and random")
    g.add_argument("--threads", type=count(0), default=0, help="ONNX Runtime threads (0 = all)")
    g.add_argument("--workers", type=count(1), metavar="N",
                   help="gradient scores: run the calibration batches on N Ray workers (a "
                        "local cluster unless --ray-address; needs pip install "
                        "'onnxprune[ray]'); the scores equal one process's")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) to score; "
                        "without --workers, one worker per CPU of the cluster")
    g.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:DIMS",
                   help=shape_help)
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def add_tolerance_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=finite(0), metavar="A",
                   help="verification: allowed absolute difference of every output from the "
                        "gated original (default 1e-5 for float32, 4 eps for float16)")
    p.add_argument("--rtol", type=finite(0), metavar="R",
                   help="verification: allowed difference relative to the largest output "
                        "magnitude (default 1e-4 for float32, 16 eps for float16)")


def version_line() -> str:
    """onnxprune's version (``onnxprune.__version__``, the one source) and its runtimes'."""
    import onnx
    import onnxruntime

    from onnxprune import __version__

    return (f"onnxprune {__version__} (onnx {onnx.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, Python {sys.version.split()[0]})")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, "onnxprune: error: MESSAGE (see onnxprune CMD --help)", exit
    2, instead of argparse's usage block (subcommand parsers are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"onnxprune: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="onnxprune",
        description="Structured pruning of attention and feed-forward blocks in ONNX models.",
        usage="onnxprune IN.onnx OUT.onnx --ratio R [options]\n"
              "       onnxprune {inspect,cut,prune,score,finetune,eval,bench} ...",
        epilog="exit codes: 0 ok, 1 internal error, 2 bad input, 3 quality gate "
               "(--max-drop) failed, 4 verification failed, 141 stdout closed early")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="onnxprune")
    shape_help = "concrete shape for an input with dynamic dims, e.g. x:1,336,7 (repeatable)"

    p = sub.add_parser("inspect", help="list attention and FFN blocks, params and FLOPs")
    p.add_argument("model", help="ONNX file")
    add_json_option(p, "the structure")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:DIMS",
                   help=shape_help)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("cut", help="remove named units and write the verified smaller model")
    p.add_argument("input", help="ONNX file to prune")
    p.add_argument("output", help="where to write the pruned model")
    p.add_argument("--remove", action="append", required=True, metavar="UNITS",
                   help="comma-separated units: attn0, attn0.head1, attn0.qk1.3, attn0.vo2.0, "
                        "ffn1, ffn1.ch7 (repeatable)")
    add_json_option(p, "what was removed, the sizes and the verification")
    add_tolerance_options(p)
    p.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:DIMS",
                   help=shape_help)
    p.set_defaults(func=cmd_cut)

    p = sub.add_parser("prune", help="the main job (also: onnxprune IN OUT --ratio R): score, "
                                     "plan, cut, verify, write",
                       epilog="exit codes: 0 ok, 2 bad input, 3 --max-drop exceeded (report "
                              "written, model not), 4 verification failed")
    p.add_argument("input", help="ONNX file to prune")
    p.add_argument("output", help="where to write the pruned model")
    p.add_argument("--ratio", type=finite(),
                   help="fraction of the prunable parameters (or FLOPs) to remove, in (0, 1)")
    p.add_argument("--target", choices=["params", "flops", "latency"], default="params",
                   help="what --ratio counts: params (default) or flops; latency: the "
                        "budget is --speedup or --latency-ms, measured in ONNX Runtime")
    p.add_argument("--prune-steps", dest="steps", type=int, default=1, metavar="K",
                   help="progressive pruning in K steps, re-scoring in between (default 1)")
    p.add_argument("--steps", dest="steps", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)   # the old name of --prune-steps
    p.add_argument("--keep", action="append", metavar="BLOCKS",
                   help="comma-separated blocks never to prune, e.g. attn0,ffn5 (repeatable)")
    add_tolerance_options(p)
    p.add_argument("--round-to", type=count(1), default=1, metavar="M",
                   help="keep FFN widths and per-head QK/VO widths multiples of M")
    p.add_argument("--report", metavar="FILE.json", help="write the run report as JSON "
                   "(the same as --json FILE)")
    add_json_option(p, "the run report")
    p.add_argument("--max-drop", type=finite(0), metavar="X",
                   help="quality gate: exit 3 without writing the model when the metric "
                        "degrades by more than X (relative, e.g. 0.05)")
    p.add_argument("--reconstruct", choices=["none", "scale", "refit", "auto"],
                   default="auto",
                   help="after the verified cut, re-fit the kept weights of each pruned "
                        "block's output projection to the original's outputs: scale (one "
                        "factor per kept head/channel), refit (ridge least squares), auto "
                        "(default: the best per block on held-out calibration data, kept only "
                        "where it lowers the held-out loss), none")
    add_latency_options(p)
    add_scoring_options(p, shape_help)
    add_finetune_options(p, "finetune-", "ft_")
    p.add_argument("--train", metavar="FILE", help="training data for --finetune-*")
    p.add_argument("--val", metavar="FILE", help="validation data for --finetune-*")
    p.add_argument("--finetune-only", choices=["all", "norms", "pruned"], default="all",
                   help="weights to fine-tune: all, norm scales and biases, or those of the "
                        "pruned blocks")
    p.add_argument("--finetune-batch-size", dest="ft_batch_size", type=count(1), default=32)
    p.add_argument("--finetune-schedule", dest="ft_schedule", choices=["after", "during"],
                   default="after",
                   help="after (default): prune, then fine-tune; during: prune in "
                        "--prune-steps steps interleaved with the --finetune-steps training "
                        "steps, scored on --train (\"Less is More\")")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="recovery fine-tuning in ONNX Runtime (no torch)")
    p.add_argument("input", help="ONNX file to fine-tune")
    p.add_argument("output", help="where to write the model with trained weights")
    p.add_argument("--train", required=True, metavar="FILE",
                   help="training data with targets: .npz or time-series .csv (train split)")
    p.add_argument("--val", metavar="FILE",
                   help="validation data (a .csv uses its val split); picks the best "
                        "checkpoint and stops early")
    p.add_argument("--batch-size", type=count(1), default=32, metavar="B")
    p.add_argument("--train-only", choices=["all", "norms"], default="all",
                   help="all weights (default) or only norm scales and biases (cheap)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--threads", type=count(0), default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_option(p, "the training run (steps, losses, best step)")
    add_finetune_options(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("score", help="score every prunable unit; cut nothing")
    p.add_argument("model", help="ONNX file")
    add_json_option(p, "every unit's score")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the per-layer sensitivity heatmap (needs matplotlib)")
    add_scoring_options(p, shape_help)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="metrics of a model on a labelled dataset")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="data with targets: .npz keyed by input and output names, or a "
                        "time-series .csv (its test split)")
    p.add_argument("--metric", choices=["mse", "mae", "acc"],
                   help="default: inferred from the targets (integer class ids: acc and "
                        "cross-entropy; float values: mse and mae)")
    p.add_argument("--batch-size", type=count(1), default=256, metavar="B")
    p.add_argument("--samples", type=count(1), metavar="N", help="a seeded subset of N samples")
    p.add_argument("--seed", type=count(0), default=0, help="seed for --samples")
    p.add_argument("--threads", type=count(0), default=0, help="ONNX Runtime threads (0 = all)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:DIMS",
                   help=shape_help)
    add_json_option(p, '{"model", "data", "samples", "metrics", "seconds"}')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench", help="latency, throughput, size, params, FLOPs and memory of models",
        description="Benchmark models as deployed: ONNX Runtime with graph optimisation "
                    "level ALL, intra-op threads pinned, inter-op 1, sequential execution, "
                    "synthetic inputs. Timed runs of the models are interleaved (A, B, A, "
                    "B, ...) so machine noise hits all alike; ratios are against the first "
                    "model at the same batch and threads.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX files; the first is the "
                   "reference for the ratios")
    p.add_argument("--batch", type=parse_counts, default=[1], metavar="B[,B...]",
                   help="batch sizes (default 1)")
    p.add_argument("--threads", type=parse_counts, default=[1], metavar="T[,T...]",
                   help="intra-op thread counts (default 1)")
    p.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="auto: CUDA when onnxruntime offers it, else CPU (default cpu)")
    p.add_argument("--warmup", type=count(0), default=10, metavar="N",
                   help="untimed runs per model first (default 10)")
    p.add_argument("--runs", type=count(1), default=100, metavar="N",
                   help="timed runs per model (default 100)")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="NAME:DIMS",
                   help="shape for inputs with dynamic dims besides the batch (its batch "
                        "entry is replaced by --batch; other dynamic dims default to 1)")
    add_json_option(p, "every field of every row")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw latency and FLOPs side by side (needs matplotlib)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory measurement (peak MB columns 0)")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.epilog = ("peak MB: the peak resident set (VmHWM) of a fresh child process per model, "
                "batch and thread count that loads the model, creates the session and runs "
                "it 3 times (interpreter and ONNX Runtime included); +model: its increase "
                "over the process before loading the model. Host memory only.")
    p.set_defaults(func=cmd_bench)
    for command in sub.choices.values():   # every command reads options from a file too
        command.add_argument("--config", metavar="FILE.toml",
                             help="take options from a TOML file (keys: long option names; "
                                  "a [COMMAND] table for one command); flags given here win")
    return parser


def _stdout_to_devnull() -> None:
    """After a broken pipe: stdout to /dev/null, so that the interpreter's last flush of the
    unwritten output cannot fail again (no "Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):   # not a real file (a test's captured stdout)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and (not argv[0].startswith("-")
                                             or argv[0].split("=")[0] == "--config"):
        argv.insert(0, "prune")
    try:
        argv = json_flag_before_model(apply_config(parser, argv, COMMANDS))
    except OnnxpruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:   # SIGTERM unwinds like Ctrl-C; a failed run removes every file it wrote
        with sigterm_as_interrupt(), transaction():
            code = run_command(args)
            sys.stdout.flush()   # a closed pipe fails here, handled below, not at exit
            return code
    except OnnxpruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:   # stdout closed early: onnxprune inspect m.onnx | head -1
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        print(f"onnxprune: {'terminated (SIGTERM)' if term else 'interrupted'}; nothing "
              "written", file=sys.stderr)
        return Terminated.exit_code if term else 130
    finally:
        ProgressBar.close_all()


if __name__ == "__main__":
    sys.exit(main())
