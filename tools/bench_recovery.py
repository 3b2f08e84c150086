"""Prune, then recover by fine-tuning in ONNX Runtime: the seed papers' comparisons.

    python tools/make_data.py                      # once: data/*.npz from ../shared/data
    nice python tools/bench_recovery.py tsfm       # "Less is More": TSFM specialised to ETTh1
    nice python tools/bench_recovery.py patchtst   # SPAT: whole attention modules, then FT
    nice python tools/bench_recovery.py ast        # "Silence": 50% of attention, heads/channels

Every fine-tuning run uses the same budget (--steps steps of --batch windows/clips, AdamW
at --lr with warm-up and cosine decay, validation picks the best checkpoint), so pruned
and dense rows compare at equal cost. Scores: fisher on 256 training samples. Metrics on
the full test split (ETTh1 test MSE, standardised, horizon 96; FSDD test accuracy).
Prints markdown tables; --json writes the raw rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxprune.bench import measure  # noqa: E402
from onnxprune.data import load_calibration  # noqa: E402
from onnxprune.finetune import FinetuneOptions, fit  # noqa: E402
from onnxprune.interleaved import prune_during_finetune  # noqa: E402
from onnxprune.pipeline import PruneOptions, run_prune  # noqa: E402
from onnxprune.runtime import make_session, run  # noqa: E402

DATA = REPO / "data"


def test_metric(model: onnx.ModelProto, test, threads: int) -> float:
    session = make_session(model, threads=threads)
    (name,) = test.targets
    outs = [run(session, inputs)[name] for inputs, _ in test.batches(256)]
    y = np.concatenate(outs)
    t = test.targets[name]
    if np.issubdtype(t.dtype, np.integer):
        return float((y.argmax(-1) == t).mean())
    return float(((y - t) ** 2).mean())


def row(label: str, model: onnx.ModelProto, test, threads: int, base_flops: int,
        extra: dict | None = None) -> dict:
    params, flops = measure(model, {i.name: (1, *test.inputs[i.name].shape[1:])
                                    for i in model.graph.input if i.name in test.inputs})
    return {"setting": label, "metric": test_metric(model, test, threads), "params": params,
            "flops_ratio": flops / base_flops, **(extra or {})}


def recover(model, train, val, args) -> tuple[onnx.ModelProto, dict]:
    result = fit(model, train, val, FinetuneOptions(
        steps=args.steps, lr=args.lr, batch_size=args.batch, eval_every=max(args.steps // 5, 1),
        patience=100, seed=args.seed, threads=args.threads))
    return result.model, {"ft_seconds": round(result.seconds, 1), "best_step": result.best_step}


def prune(model, calib, ratio: float, granularity: str, method: str, args):
    opts = PruneOptions(ratio, method, granularity, seed=args.seed, threads=args.threads)
    pruned, report = run_prune(model, calib, opts)
    return pruned, {"ratio": ratio, "granularity": granularity, "method": method,
                    "removed": len(report.removed)}


def forecaster(args, name: str, settings: list[tuple[str, float, str, str]]) -> list[dict]:
    model = onnx.load(str(REPO / "models" / f"{name}.onnx"))
    calib = load_calibration(DATA / "etth1_train.npz", model, samples=256, seed=args.seed)
    train = load_calibration(DATA / "etth1_train.npz", model)
    val = load_calibration(DATA / "etth1_val.npz", model, samples=512, seed=args.seed)
    test = load_calibration(DATA / "etth1_test.npz", model)
    _, base_flops = measure(model, {"x": (1, 336, 7)})
    rows = [row("dense, no fine-tuning", model, test, args.threads, base_flops)]
    tuned, info = recover(model, train, val, args)
    rows.append(row(f"dense, full fine-tuning ({args.steps} steps)", tuned, test, args.threads,
                    base_flops, info))
    for label, ratio, granularity, method in settings:
        pruned, pinfo = prune(model, calib, ratio, granularity, method, args)
        rows.append(row(f"{label}, no fine-tuning", pruned, test, args.threads, base_flops,
                        pinfo))
        tuned, info = recover(pruned, train, val, args)
        rows.append(row(f"{label}, then fine-tuning", tuned, test, args.threads, base_flops,
                        {**pinfo, **info}))
        print(json.dumps(rows[-1]), flush=True)
        if args.during:
            tuned, info = during(model, calib, train, val, ratio, granularity, method, args)
            rows.append(row(f"{label}, pruned during fine-tuning ({args.during} prune steps)",
                            tuned, test, args.threads, base_flops, info))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def during(model, calib, train, val, ratio, granularity, method, args):
    """"Less is More" as coded: --during K prune steps interleaved with the same training
    steps (scored on the same 256 training windows as the other rows)."""
    start = time.perf_counter()
    opts = PruneOptions(ratio, method, granularity, steps=args.during, seed=args.seed,
                        threads=args.threads)
    tune = FinetuneOptions(steps=args.steps, lr=args.lr, batch_size=args.batch,
                           eval_every=max(args.steps // 5, 1), patience=100, seed=args.seed,
                           threads=args.threads)
    tuned, report, run_ = prune_during_finetune(model, calib, train, val, opts, tune)
    return tuned, {"ft_seconds": round(time.perf_counter() - start, 1),
                   "best_step": run_.final.best_step, "removed": len(report.removed)}


def ast(args) -> list[dict]:
    model = onnx.load(str(REPO / "models" / "ast_fsdd.onnx"))
    calib = load_calibration(DATA / "fsdd_train.npz", model, samples=256, seed=args.seed)
    full = load_calibration(DATA / "fsdd_train.npz", model)
    order = np.random.default_rng(args.seed).permutation(full.n_samples)
    cut = int(0.9 * full.n_samples)   # no separate FSDD validation split: hold out 10%
    train = type(full)({k: v[order[:cut]] for k, v in full.inputs.items()},
                       {k: v[order[:cut]] for k, v in full.targets.items()}, full.source, False)
    val = type(full)({k: v[order[cut:]] for k, v in full.inputs.items()},
                     {k: v[order[cut:]] for k, v in full.targets.items()}, full.source, False)
    test = load_calibration(DATA / "fsdd_test.npz", model)
    _, base_flops = measure(model, {"x": (1, 1, 64, 96)})
    from onnxprune.structure.discover import analyse

    structure = analyse(model, {"x": (1, 1, 64, 96)}).structure
    attn = sum(b.params for b in structure.attention)
    prunable = sum(b.params for b in structure.blocks)
    ratio = 0.5 * attn / prunable      # 50% of the attention parameters
    rows = [row("dense", model, test, args.threads, base_flops)]
    tuned, info = recover(model, train, val, args)
    rows.append(row(f"dense, fine-tuned ({args.steps} steps)", tuned, test, args.threads,
                    base_flops, info))
    for granularity in ("head", "channel"):
        for method in ("fisher", "magnitude"):
            pruned, pinfo = prune(model, calib, ratio, granularity, method, args)
            label = f"50% attention params, {granularity} ({method})"
            rows.append(row(f"{label}, no fine-tuning", pruned, test, args.threads,
                            base_flops, pinfo))
            tuned, info = recover(pruned, train, val, args)
            rows.append(row(f"{label}, then fine-tuning", tuned, test, args.threads,
                            base_flops, {**pinfo, **info}))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows: list[dict], metric: str) -> str:
    lines = [f"| setting | {metric} | params | FLOPs vs dense | fine-tuning time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['metric']:.4f} | {r['params'] / 1e6:.2f}M | "
                     f"{r['flops_ratio']:.2f} | {r.get('ft_seconds', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=["tsfm", "patchtst", "ast"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--methods", nargs="+", default=["fisher"],
                   help="scores for the tsfm experiment (default fisher)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.35, 0.5],
                   help="ratios for the tsfm experiment")
    p.add_argument("--during", type=int, default=0, metavar="K",
                   help="tsfm: also prune during fine-tuning in K prune steps within the "
                        "same --steps (\"Less is More\" as coded)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.experiment == "tsfm":
        rows = forecaster(args, "tsfm_small", [
            (f"{m} auto {r:.0%}", r, "auto", m) for m in args.methods
            for r in args.ratios])
        metric = "ETTh1 test MSE"
    elif args.experiment == "patchtst":
        rows = forecaster(args, "patchtst_etth1", [
            ("SPAT: 1 attention module (send)", 0.16, "module", "send"),
            ("1 attention module (fisher)", 0.16, "module", "fisher"),
            ("fisher auto 35%", 0.35, "auto", "fisher")])
        metric = "ETTh1 test MSE"
    else:
        rows = ast(args)
        metric = "FSDD test accuracy"
    print(render(rows, metric))
    print(f"\n{time.perf_counter() - start:.0f} s; steps {args.steps}, batch {args.batch}, "
          f"lr {args.lr}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
