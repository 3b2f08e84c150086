"""Benchmarks of issue 4 ("Performance"); each section prints a markdown table.

    python tools/bench_pruning.py grad-cost                  # gradient pass vs forward pass
    python tools/bench_pruning.py timing [--skip-encoder]    # whole runs: PatchTST, BERT-base
    python tools/bench_pruning.py accuracy --jobs 8 --json results.json
    python tools/bench_pruning.py accuracy --render results.json   # markdown from saved results
    python tools/bench_pruning.py latency                    # ORT CPU latency, batch 1, 1 thread

``--out FILE`` appends each printed table to FILE.  Reference models and data: models/*.onnx
and the npz files written by ``tools/make_data.py`` (``--data DIR`` to read them elsewhere).
Calibration: 256 samples (seed 0) of the train split; evaluation: the whole test split,
test MSE for the forecasters, test accuracy for the AST classifier.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.batches import LossBatches  # noqa: E402
from onnxprune.bench import measure  # noqa: E402
from onnxprune.data import load_calibration  # noqa: E402
from onnxprune.errors import OnnxpruneError  # noqa: E402
from onnxprune.losses import choose_loss  # noqa: E402
from onnxprune.pipeline import cut_units  # noqa: E402
from onnxprune.plan import prunable_total, select  # noqa: E402
from onnxprune.reconstruct import reconstruct  # noqa: E402
from onnxprune.scores import check_method, compute_scores  # noqa: E402
from onnxprune.scores.gradient import GradientPass  # noqa: E402
from onnxprune.structure.discover import analyse  # noqa: E402

# name -> (model file, calibration npz, test npz, metric)
MODELS = {
    "patchtst": ("models/patchtst_etth1.onnx", "etth1_train.npz", "etth1_test.npz", "mse"),
    "tsfm": ("models/tsfm_small.onnx", "etth1_train.npz", "etth1_test.npz", "mse"),
    "ast": ("models/ast_fsdd.onnx", "fsdd_train.npz", "fsdd_test.npz", "accuracy"),
}
METHODS = ("fisher", "lim", "taylor", "send", "ablation", "stat", "magnitude", "random")
GRANS = ("module", "head", "channel", "auto")
RATIOS = (0.2, 0.35, 0.5, 0.7)
RANDOM_SEEDS = (0, 1, 2)
GUIDED = ("fisher", "lim", "taylor", "ablation")
SAMPLES, SEED, EVAL_BATCH = 256, 0, 256
RECONSTRUCT = "auto"        # --reconstruct: the main job's default; "none" for the cut alone
ALL_GATES = {"module", "head", "qk", "vo", "ch"}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> str:
    return f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, " \
           f"{cores()} cores, onnxruntime {ort.__version__}"


def emit(text: str, out: str | None) -> None:
    print(text, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(text + "\n")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def median_time(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def load_model(name: str) -> onnx.ModelProto:
    return onnx.load(str(ROOT / MODELS[name][0]))


def calibration(name: str, model: onnx.ModelProto, data_dir: Path):
    return load_calibration(data_dir / MODELS[name][1], model, samples=SAMPLES, seed=SEED)


def evaluate(model: onnx.ModelProto, name: str, data_dir: Path, threads: int) -> float:
    """Test MSE (forecasters) or test accuracy (classifier) over the whole test split."""
    test = np.load(data_dir / MODELS[name][2])
    x = test["x"]
    sess = session(model, threads)
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    outs = [sess.run([out_name], {in_name: x[i:i + EVAL_BATCH]})[0]
            for i in range(0, len(x), EVAL_BATCH)]
    pred = np.concatenate(outs)
    if MODELS[name][3] == "mse":
        return float(np.mean((pred.astype(np.float64) - test["y"]) ** 2))
    return float(np.mean(pred.argmax(-1) == test["logits"]))


# --- 1. gradient pass cost ------------------------------------------------------------


def grad_cost(args) -> None:
    rows = []
    for name in args.models:
        model = load_model(name)
        analysis = analyse(model)
        calib = calibration(name, model, args.data).take(32)
        spec = choose_loss(model, calib.targets)
        inputs, feeds = LossBatches(model, calib, spec, 32, args.threads).batches[0]
        grad = GradientPass(analysis, spec, ALL_GATES, threads=args.threads)
        fwd = session(model, args.threads)
        gated = session(grad.gated.model, args.threads)
        gated_feeds = {**inputs, **grad.gated.feeds(batch=len(next(iter(inputs.values()))))}
        fwd_t = median_time(lambda f=fwd, i=inputs: f.run(None, i), args.runs)
        gated_t = median_time(lambda g=gated, i=gated_feeds: g.run(None, i), args.runs)
        grad_t = median_time(lambda g=grad, i=inputs, t=feeds: g(i, t), args.runs)
        n_fwd, n_grad = len(model.graph.node), len(grad.graph.model.graph.node)
        n_gated = len(grad.gated.model.graph.node)
        rows.append([name, f"{fwd_t * 1e3:.1f}", f"{gated_t * 1e3:.1f}", f"{grad_t * 1e3:.1f}",
                     f"**{grad_t / fwd_t:.2f}×**", f"{n_fwd}", f"{n_gated}",
                     f"{n_grad} ({n_grad / n_fwd:.2f}×)", f"{len(grad.gates)}"])
        print(f"# {name}: forward {fwd_t:.4f}s gradient {grad_t:.4f}s", file=sys.stderr)
    emit(f"\nGradient pass (all gate kinds: {', '.join(sorted(ALL_GATES))}; per-sample "
         f"gates, loss included) vs forward pass of the original model; batch 32 of "
         f"calibration inputs, {args.threads} intra-op threads, median of {args.runs} runs "
         f"after 2 warm-up runs. Machine: {machine()}.\n", args.out)
    emit(table(["model", "forward ms", "gated forward ms", "gradient ms", "gradient / forward",
                "forward nodes", "gated nodes", "gradient-graph nodes", "gate inputs"],
               rows), args.out)


# --- 2. whole-run time ----------------------------------------------------------------


def export_encoder(path: str, seq: int, opset: int) -> int:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, vocab_size=30522, attn_implementation="eager")
    bert = BertModel(cfg, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = Encoder().eval()
    ids = torch.zeros(2, seq, dtype=torch.int64)
    mask = torch.ones(2, seq, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), path, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=opset, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "last_hidden_state": {0: "batch"}})
    return sum(p.numel() for p in model.parameters())


def timing(args) -> None:
    import onnxprune

    rows = []
    path = ROOT / MODELS["patchtst"][0]
    start = time.perf_counter()
    _, rep = onnxprune.prune(str(path), 0.5, calib=str(args.data / MODELS["patchtst"][1]),
                             samples=256)
    wall = time.perf_counter() - start
    rows.append(["patchtst_etth1.onnx", f"{rep.params_before / 1e6:.2f} M",
                 "ETTh1 train, 256 windows, batch 32", f"**{wall:.1f}**", f"{rep.seconds:.1f}",
                 f"{1 - rep.params_after / rep.params_before:.1%}",
                 f"{1 - rep.flops_after / rep.flops_before:.1%}"])
    print(f"# patchtst: {wall:.1f}s", file=sys.stderr)
    if not args.skip_encoder:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = os.path.join(tmp, "bert.onnx")
            t0 = time.perf_counter()
            n_params = export_encoder(onnx_path, args.seq, args.opset)
            print(f"# bert exported in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            start = time.perf_counter()
            _, rep = onnxprune.prune(onnx_path, 0.5, samples=32, batch_size=8)
            wall = time.perf_counter() - start
        rows.append([f"BERT-base encoder (random init, seq {args.seq}, eager attention, "
                     f"opset {args.opset})", f"{n_params / 1e6:.1f} M",
                     "data-free: 32 synthetic samples, batch 8", f"**{wall:.1f}**",
                     f"{rep.seconds:.1f}", f"{1 - rep.params_after / rep.params_before:.1%}",
                     f"{1 - rep.flops_after / rep.flops_before:.1%}"])
        print(f"# bert: {wall:.1f}s", file=sys.stderr)
    emit(f"\n`onnxprune.prune(model, 0.5)` (fisher, auto granularity, verification "
         f"included), wall time of the Python call. Machine: {machine()}.\n", args.out)
    emit(table(["model", "params", "calibration", "wall s", "report.seconds",
                "params removed (whole model)", "FLOPs removed"], rows), args.out)


# --- 3. accuracy sweep ----------------------------------------------------------------


def cells(models, methods, grans=GRANS) -> list[tuple]:
    out = []
    for name in models:
        out.append((name, "dense", "-", 0))
        for method in methods:
            for gran in grans:
                try:
                    check_method(method, gran)
                except OnnxpruneError:
                    continue
                for seed in (RANDOM_SEEDS if method == "random" else (SEED,)):
                    out.append((name, method, gran, seed))
    cost = {"ablation": 0, "fisher": 1, "taylor": 1, "send": 1, "stat": 2}
    order = {"ast": 0, "tsfm": 1, "patchtst": 2}
    return sorted(out, key=lambda c: (cost.get(c[1], 3), order[c[0]]))


def run_cell(job) -> list[dict]:
    (name, method, gran, seed), ratios, data_dir, threads = job
    start = time.perf_counter()
    model = load_model(name)
    base = {"model": name, "method": method, "granularity": gran, "seed": seed}
    if method == "dense":
        value = evaluate(model, name, data_dir, threads)
        return [{**base, "ratio": 0.0, "metric": value, "flops_reduction": 0.0,
                 "params_reduction": 0.0, "seconds": time.perf_counter() - start}]
    analysis = analyse(model)
    calib = calibration(name, model, data_dir)
    spec = choose_loss(model, calib.targets)
    kinds = check_method(method, gran)
    data = LossBatches(model, calib, spec, 32, threads)
    scores = compute_scores(analysis, data, spec, method, kinds, seed=seed, threads=threads)
    score_s = time.perf_counter() - start
    total = prunable_total(analysis)
    s = analysis.structure
    out = []
    for ratio in ratios:
        rec = {**base, "ratio": ratio, "score_seconds": round(score_s, 2),
               "fallbacks": scores.fallbacks}
        try:
            sel = select(analysis, scores, kinds, ratio * total)
        except OnnxpruneError as exc:
            found = re.search(r"removing ([\d.]+)%", str(exc))
            rec.update(error=str(exc), max_ratio=float(found.group(1)) / 100 if found else None)
            out.append(rec)
            continue
        pruned, check = cut_units(analysis, sel.units)
        params, flops = measure(pruned, s.input_shapes)
        cut_metric = evaluate(pruned, name, data_dir, threads)
        if RECONSTRUCT != "none":
            pruned, _ = reconstruct(analysis, analyse(pruned, s.input_shapes), pruned, data,
                                    RECONSTRUCT, threads)
        rec.update(metric=evaluate(pruned, name, data_dir, threads), cut_metric=cut_metric,
                   flops_reduction=1 - flops / s.flops, params_reduction=1 - params / s.params,
                   prunable_removed=sel.fraction, by_kind=sel.by_kind,
                   max_abs_diff=float(check.max_abs_diff))
        out.append(rec)
    for rec in out:
        rec["seconds"] = round(time.perf_counter() - start, 2)
    return out


def accuracy(args) -> None:
    if args.render:
        saved = json.loads(Path(args.render[0]).read_text())
        for extra in args.render[1:]:
            more = json.loads(Path(extra).read_text())
            saved["results"] += more["results"]
            saved["runs"] = saved.get("runs", []) + more.get("runs", [])
        render(saved, args.out)
        return
    global RECONSTRUCT
    RECONSTRUCT = args.reconstruct       # the forked workers see it
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, cores() // jobs)
    todo = cells(args.models, args.methods, args.granularities)
    results: list[dict] = []
    saved = {"runs": [{"command": " ".join(sys.argv), "machine": machine(), "jobs": jobs,
                       "threads_per_job": threads, "ratios": args.ratios}],
             "results": results}
    start = time.perf_counter()
    payload = [(cell, args.ratios, args.data, threads) for cell in todo]
    ctx = mp.get_context("fork")
    with ctx.Pool(jobs, maxtasksperchild=4) as pool:
        for done, recs in enumerate(pool.imap_unordered(run_cell, payload), 1):
            results.extend(recs)
            r = recs[0]
            print(f"# [{done}/{len(todo)}] {r['model']} {r['method']} {r['granularity']} "
                  f"seed {r['seed']}: {r['seconds']:.0f}s ({time.perf_counter() - start:.0f}s"
                  " elapsed)", file=sys.stderr, flush=True)
            if args.json:
                saved["runs"][0]["seconds"] = round(time.perf_counter() - start, 1)
                Path(args.json).write_text(json.dumps(saved, indent=1))
    render(saved, args.out)


def fmt_metric(value: float, kind: str) -> str:
    return f"{value:.4f}" if kind == "mse" else f"{value:.1%}"


def aggregate(results: list[dict]) -> dict:
    """(model, method, granularity, ratio) -> dict(metric, flops, error, n) (random: mean)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["method"], r["granularity"], r["ratio"]), []).append(r)
    out = {}
    for key, recs in groups.items():
        ok = [r for r in recs if "metric" in r]
        if ok:
            out[key] = {"metric": float(np.mean([r["metric"] for r in ok])),
                        "flops": float(np.mean([r["flops_reduction"] for r in ok])),
                        "n": len(ok), "std": float(np.std([r["metric"] for r in ok]))}
            if all("cut_metric" in r for r in ok):
                out[key]["cut"] = float(np.mean([r["cut_metric"] for r in ok]))
        else:
            out[key] = {"error": recs[0].get("error", "?"), "max": recs[0].get("max_ratio")}
    return out


def render(saved: dict, out: str | None) -> None:
    results = saved["results"]
    agg = aggregate(results)
    ratios = sorted({r["ratio"] for r in results if r["method"] != "dense"})
    for run in saved.get("runs", []):
        emit(f"\nRun: `{run['command']}` on {run['machine']}; {run['jobs']} parallel jobs × "
             f"{run['threads_per_job']} threads"
             + (f"; {run['seconds']:.0f} s" if "seconds" in run else "") + ".", out)
    for name in [m for m in MODELS if any(r["model"] == m for r in results)]:
        kind = MODELS[name][3]
        dense = agg.get((name, "dense", "-", 0.0))
        label = "test MSE (lower is better)" if kind == "mse" else "test accuracy"
        emit(f"\n### {name} ({MODELS[name][0]}): {label}, FLOPs removed in brackets\n", out)
        rows = [["dense", "-", fmt_metric(dense["metric"], kind) if dense else "not run"]
                + [""] * (len(ratios) - 1)]
        for method in METHODS:
            for gran in GRANS:
                if not any((name, method, gran, r) in agg for r in ratios):
                    continue
                row = [method + (" (mean of 3 seeds)" if method == "random" else ""), gran]
                for ratio in ratios:
                    cell = agg.get((name, method, gran, ratio))
                    if cell is None:
                        row.append("not run")
                    elif "error" in cell:
                        row.append(f"n/a (max {cell['max']:.0%})" if cell["max"] is not None
                                   else "error")
                    else:
                        cut = (f"{fmt_metric(cell['cut'], kind)} → " if "cut" in cell
                               and cell["cut"] != cell["metric"] else "")
                        row.append(f"{cut}{fmt_metric(cell['metric'], kind)} "
                                   f"(−{cell['flops']:.0%})")
                rows.append(row)
        emit(table(["method", "granularity"] + [f"ratio {r}" for r in ratios], rows), out)
        emit("\n" + verdict(name, agg, ratios), out)


def verdict(name: str, agg: dict, ratios: list[float]) -> str:
    """Do fisher/taylor/ablation beat magnitude and random (same granularity) at ratio ≥ 0.35?"""
    better = (lambda a, b: a < b) if MODELS[name][3] == "mse" else (lambda a, b: a > b)
    wins, losses, missing = 0, [], 0
    for method in GUIDED:
        for gran in GRANS:
            for ratio in [r for r in ratios if r >= 0.35]:
                mine = agg.get((name, method, gran, ratio))
                if mine is None or "metric" not in mine:
                    continue
                for base in ("magnitude", "random"):
                    other = agg.get((name, base, gran, ratio))
                    if other is None or "metric" not in other:
                        missing += 1
                        continue
                    if better(mine["metric"], other["metric"]):
                        wins += 1
                    else:
                        kind = MODELS[name][3]
                        losses.append(f"{method}/{gran} @ {ratio}: "
                                      f"{fmt_metric(mine['metric'], kind)} vs {base} "
                                      f"{fmt_metric(other['metric'], kind)}")
    head = f"**{name}**: loss-guided (fisher/lim/taylor/ablation) vs magnitude and random at the " \
           f"same granularity, ratios ≥ 0.35: {wins} of {wins + len(losses)} comparisons won."
    if not wins and not losses:
        return f"**{name}**: no loss-guided result to compare at ratios ≥ 0.35."
    if not losses:
        return head + " They beat both baselines in every comparison."
    return head + " Not better in: " + "; ".join(losses) + "."


# --- 4. latency -----------------------------------------------------------------------


def latency(args) -> None:
    import onnxprune

    rows = []
    for name in args.models:
        model = load_model(name)
        variants = [("dense", "-", model, 0.0, 0.0)]
        for gran in ("auto", "head", "module"):
            try:
                pruned, rep = onnxprune.prune(model, 0.5, calib=str(args.data / MODELS[name][1]),
                                              samples=SAMPLES, granularity=gran)
            except OnnxpruneError as exc:
                variants.append((f"fisher {gran}", str(exc).split(":")[0], None, 0, 0))
                continue
            variants.append((f"fisher {gran}", "0.5", pruned, 1 - rep.flops_after /
                             rep.flops_before, 1 - rep.params_after / rep.params_before))
        shape = (1, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]])
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        dense_t = None
        for label, ratio, m, flops_red, params_red in variants:
            if m is None:
                rows.append([name, label, ratio, "-", "-", "-", "-", "-"])
                continue
            sess = session(m, 1)
            feed = {sess.get_inputs()[0].name: x}
            t = median_time(lambda s=sess, f=feed: s.run(None, f), args.runs, warmup=10)
            dense_t = dense_t or t
            ideal = 1 / (1 - flops_red)
            rows.append([name, label, ratio, f"{params_red:.1%}", f"{flops_red:.1%}",
                         f"{t * 1e3:.3f}", f"{dense_t / t:.2f}×", f"{ideal:.2f}×"])
            print(f"# {name} {label}: {t * 1e3:.3f} ms", file=sys.stderr)
    emit(f"\nONNX Runtime CPU latency, batch 1, intra_op_num_threads=1, "
         f"ORT_ENABLE_ALL, median of {args.runs} runs after 10 warm-up runs; pruned with "
         f"`onnxprune.prune(model, 0.5, calib=<train npz>, samples=256, granularity=G)` "
         f"(fisher). Machine: {machine()}.\n", args.out)
    emit(table(["model", "variant", "ratio", "params removed", "FLOPs removed",
                "latency ms", "speed-up", "ideal (FLOPs ratio)"], rows), args.out)


# --- CLI ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, default=ROOT / "data",
                        help="folder with the npz files of tools/make_data.py")
    common.add_argument("--out", help="append the markdown tables to this file")
    sub = parser.add_subparsers(dest="section", required=True)

    def add(name: str, fn, models=True):
        p = sub.add_parser(name, parents=[common])
        p.set_defaults(fn=fn)
        if models:
            p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
        return p

    p = add("grad-cost", grad_cost)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p = add("timing", timing, models=False)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--skip-encoder", action="store_true")
    p.add_argument("--opset", type=int, default=18,
                   help="export opset (17 fails: the loss subgraph uses ReduceMean-18)")
    p = add("accuracy", accuracy)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--granularities", nargs="+", choices=GRANS, default=list(GRANS))
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="per job (default cores / jobs)")
    p.add_argument("--json", help="write raw results here (updated after every cell)")
    p.add_argument("--render", nargs="+", metavar="JSON",
                   help="only render saved --json results (several are merged)")
    p.add_argument("--reconstruct", choices=["none", "scale", "refit", "auto"],
                   default="auto", help="after each cut, as the main job (default auto); "
                                        "cells show cut → reconstructed")
    p = add("latency", latency)
    p.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    args.data = Path(args.data).resolve()
    args.fn(args)


if __name__ == "__main__":
    main()
