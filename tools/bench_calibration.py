"""Issue 14, items 1–3: does more calibration data ever make the pruned model worse, and what
do the mask search and the rearrangement add? Prints a markdown table.

    python tools/bench_calibration.py                        # patchtst, ratio 0.5
    python tools/bench_calibration.py --samples 256 512 --draws 5 --methods fisher lim
    python tools/bench_calibration.py --model ast --ratio 0.7 --samples 256 --methods fisher \
        --planners search+rearrange +reconstruct               # the cut vs reconstructed

For each method, calibration size and draw (seed d: a seeded random subset of the model's
train split, the .npz of ``tools/make_data.py``), the scores are computed once and planned
three ways: ``greedy`` (score per unit of cost, cheapest first: the earlier planner),
``search`` (the mask search alone) and ``search+rearrange`` (the same as ``search`` for
scores without gradient sketches); ``+reconstruct`` is ``search+rearrange`` followed by
``--reconstruct auto``: the main job's default path. Each is cut and measured on the whole
test split (test MSE for the forecasters, accuracy for the AST). No fine-tuning. Then per
(method, size, planner): mean, and the relative spread (max − min) / mean over the draws.
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

from bench_pruning import MODELS, evaluate  # noqa: E402

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
    calib = load_calibration(args.data / MODELS[args.model][1], model, samples=samples,
                             seed=draw)
    spec = choose_loss(model, calib.targets)
    kinds = check_method(method, "auto")
    data = LossBatches(model, calib, spec, 32, args.threads)
    scores = compute_scores(analysis, data, spec, method, kinds, threads=args.threads)
    budget = args.ratio * prunable_total(analysis)
    rows = []
    for planner in args.planners:
        chosen = plan(planner if planner != "+reconstruct" else "search+rearrange",
                      analysis, scores, kinds, budget)
        pruned, _ = cut_units(analysis, chosen.units)
        if planner == "+reconstruct":       # the main job's default path
            pruned, _ = reconstruct(analysis, analyse(pruned), pruned, data, "auto",
                                    args.threads)
        rows.append({"method": method, "samples": samples, "draw": draw, "planner": planner,
                     "value": evaluate(pruned, args.model, args.data, args.threads),
                     "swaps": chosen.swaps, "counts": _kind_totals(chosen.counts)})
    seconds = time.perf_counter() - start
    for row in rows:
        print(f"  {method} n={samples} draw={draw} {row['planner']}: {_shown(row['value'])} "
              f"{row['counts']} swaps {row['swaps']} ({seconds:.0f} s)", flush=True)
    return rows


def _kind_totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_kind in counts.values():
        for key, n in per_kind.items():
            out[key] = out.get(key, 0) + n
    return out


def _shown(value: float) -> str:
    return f"{value:.1%}" if _ACCURACY else f"{value:.4f}"


_ACCURACY = False    # set by main: the model's metric is accuracy


def table(rows: list[dict], dense: float) -> str:
    draws = sorted({r["draw"] for r in rows})
    head = ["method", "clips" if _ACCURACY else "windows", "planner",
            *[f"draw {d}" for d in draws], "mean", "spread (max−min)/mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["method"], r["samples"], r["planner"]) for r in rows},
                  key=lambda k: (k[0], k[1], PLANNERS.index(k[2])))
    for method, samples, planner in keys:
        values = [r["value"] for d in draws for r in rows
                  if (r["method"], r["samples"], r["planner"], r["draw"]) ==
                  (method, samples, planner, d)]
        mean = statistics.fmean(values)
        spread = (max(values) - min(values)) / mean
        lines.append(f"| {method} | {samples} | {planner} | "
                     + " | ".join(_shown(v) for v in values)
                     + f" | {_shown(mean)} | {spread:.1%} |")
    metric = "test accuracy" if _ACCURACY else "test MSE"
    lines.append(f"\ndense {metric} {_shown(dense)}; ratio of prunable parameters removed; "
                 "+reconstruct = search+rearrange then --reconstruct auto (the main job's "
                 "default); no fine-tuning")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="patchtst")
    parser.add_argument("--planners", nargs="+", choices=PLANNERS, default=list(PLANNERS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["fisher", "lim"])
    parser.add_argument("--data", type=Path, default=ROOT / "data",
                        help="folder with the npz files of tools/make_data.py")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    global _ACCURACY
    _ACCURACY = MODELS[args.model][3] == "accuracy"
    np.random.seed(0)
    model = onnx.load(str(ROOT / MODELS[args.model][0]))
    dense = evaluate(model, args.model, args.data, args.threads)
    rows = []
    for method in args.methods:
        for samples in args.samples:
            for draw in range(args.draws):
                rows += run_draw(args, model, method, samples, draw)
    print(table(rows, dense))


if __name__ == "__main__":
    main()
