"""Issue 14, items 1–3: does more calibration data ever make the pruned model worse, and what
do the mask search and the rearrangement add? Prints a markdown table.

    python tools/bench_calibration.py                        # patchtst, ratio 0.5
    python tools/bench_calibration.py --samples 256 512 --draws 5 --methods fisher lim

For each method, calibration size and draw (seed d: a seeded random subset of the ETTh1
train windows, the .npz of ``tools/make_data.py``), the scores are computed once and planned
three ways: ``greedy`` (score per unit of cost, cheapest first: the earlier planner),
``search`` (the mask search alone) and ``search+rearrange`` (the same as ``search`` for
scores without gradient sketches); ``+reconstruct`` is ``search+rearrange`` followed by
``--reconstruct auto``: the main job's default path. Each is cut and the test MSE measured
on the whole ETTh1 test split. No fine-tuning. Then per (method, size, planner): mean, and
the relative spread (max − min) / mean over the draws.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_pruning import evaluate  # noqa: E402

from onnxprune.batches import LossBatches  # noqa: E402
from onnxprune.data import load_calibration  # noqa: E402
from onnxprune.losses import choose_loss  # noqa: E402
from onnxprune.pipeline import cut_units  # noqa: E402
from onnxprune.plan import prunable_total, select, select_greedy  # noqa: E402
from onnxprune.reconstruct import reconstruct  # noqa: E402
from onnxprune.scores import check_method, compute_scores  # noqa: E402
from onnxprune.structure.discover import analyse  # noqa: E402

PLANNERS = ("greedy", "search", "search+rearrange", "+reconstruct")


def plan(planner: str, analysis, scores, kinds, budget):
    if planner == "greedy":
        return select_greedy(analysis, scores, kinds, budget)
    if planner == "search":
        return select(analysis, replace(scores, gradients={}), kinds, budget)
    return select(analysis, scores, kinds, budget)


def run_draw(args, model: onnx.ModelProto, method: str, samples: int, draw: int) -> list[dict]:
    start = time.perf_counter()
    analysis = analyse(model)
    calib = load_calibration(args.data / "etth1_train.npz", model, samples=samples, seed=draw)
    spec = choose_loss(model, calib.targets)
    kinds = check_method(method, "auto")
    data = LossBatches(model, calib, spec, 32, args.threads)
    scores = compute_scores(analysis, data, spec, method, kinds, threads=args.threads)
    budget = args.ratio * prunable_total(analysis)
    rows = []
    for planner in PLANNERS:
        chosen = plan(planner if planner != "+reconstruct" else "search+rearrange",
                      analysis, scores, kinds, budget)
        pruned, _ = cut_units(analysis, chosen.units)
        if planner == "+reconstruct":       # the main job's default path
            pruned, _ = reconstruct(analysis, analyse(pruned), pruned, data, "auto",
                                    args.threads)
        rows.append({"method": method, "samples": samples, "draw": draw, "planner": planner,
                     "mse": evaluate(pruned, "patchtst", args.data, args.threads),
                     "swaps": chosen.swaps, "counts": _kind_totals(chosen.counts)})
    seconds = time.perf_counter() - start
    for row in rows:
        print(f"  {method} n={samples} draw={draw} {row['planner']}: mse {row['mse']:.4f} "
              f"{row['counts']} swaps {row['swaps']} ({seconds:.0f} s)", flush=True)
    return rows


def _kind_totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_kind in counts.values():
        for key, n in per_kind.items():
            out[key] = out.get(key, 0) + n
    return out


def table(rows: list[dict], dense: float) -> str:
    draws = sorted({r["draw"] for r in rows})
    head = ["method", "windows", "planner", *[f"draw {d}" for d in draws], "mean",
            "spread (max−min)/mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["method"], r["samples"], r["planner"]) for r in rows},
                  key=lambda k: (k[0], k[1], PLANNERS.index(k[2])))
    for method, samples, planner in keys:
        values = [r["mse"] for d in draws for r in rows
                  if (r["method"], r["samples"], r["planner"], r["draw"]) ==
                  (method, samples, planner, d)]
        mean = statistics.fmean(values)
        spread = (max(values) - min(values)) / mean
        lines.append(f"| {method} | {samples} | {planner} | "
                     + " | ".join(f"{v:.4f}" for v in values)
                     + f" | {mean:.4f} | {spread:.1%} |")
    lines.append(f"\ndense test MSE {dense:.4f}; ratio of prunable parameters removed; "
                 "+reconstruct = search+rearrange then --reconstruct auto (the main job's "
                 "default); no fine-tuning")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["fisher", "lim"])
    parser.add_argument("--data", type=Path, default=ROOT / "data",
                        help="folder with the npz files of tools/make_data.py")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    np.random.seed(0)
    model = onnx.load(str(ROOT / "models" / "patchtst_etth1.onnx"))
    dense = evaluate(model, "patchtst", args.data, args.threads)
    rows = []
    for method in args.methods:
        for samples in args.samples:
            for draw in range(args.draws):
                rows += run_draw(args, model, method, samples, draw)
    print(table(rows, dense))


if __name__ == "__main__":
    main()
