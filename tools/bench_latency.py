"""Latency as a budget (issue 14, item 5): does ``--target latency --speedup S`` land within
5 % of S? Prints a markdown table, one row per reference model and requested speed-up.

    python tools/bench_latency.py                       # 3 models x speed-ups 1.5, 2.0
    python tools/bench_latency.py --models patchtst --speedups 1.5 --runs 300

Each run is ``onnxprune.prune(model, target="latency", speedup=S, threads=1,
latency_batch=1)`` (ONNX Runtime CPU, batch 1, 1 thread) with 64 calibration samples, seed 0:
ETTh1 windows (train split) for the forecasters, synthetic inputs for the AST. The
latency table is measured once per model into a fresh cache folder (so the first speed-up's
wall time includes it; ``--cache DIR`` to reuse one). Afterwards the original and the pruned
model are timed again, independently of the run: ``--runs`` runs each, interleaved A/B
(original, pruned, original, ...), after 20 warm-up runs; the speed-up is the median of the
per-round ratios. ``in-run`` is the speed-up the run itself measured (50 interleaved runs).
On a shared machine the timings are noisy: read them with the load average printed above
the table.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from onnxprune import latency  # noqa: E402
from onnxprune.modelio import load_model  # noqa: E402

DATA = Path(os.environ.get("ONNXPRUNE_DATA", ROOT.parent / "shared" / "data"))
MODELS = {   # name -> (model file, calibration: a file under DATA, or None for synthetic)
    "patchtst": ("models/patchtst_etth1.onnx", "ETTh1.csv"),
    "ast": ("models/ast_fsdd.onnx", None),
    "tsfm": ("models/tsfm_small.onnx", "ETTh1.csv"),
}


def kind_of(unit: str) -> str:
    """attn0 -> attn, attn0.head3 -> head, ffn1.ch7 -> ch, attn0.qk1.2 -> qk."""
    block, _, rest = unit.partition(".")
    return re.sub(r"\d+", "", rest.split(".")[0]) if rest else re.sub(r"\d+", "", block)


def plan_text(removed: list[str]) -> str:
    counts = Counter(kind_of(u) for u in removed)
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def one_run(name: str, speedup: float, runs: int) -> dict:
    path, calib = MODELS[name]
    start = time.perf_counter()
    pruned, report = onnxprune.prune(
        path, calib=str(DATA / calib) if calib else None, samples=64, seed=0,
        target="latency", speedup=speedup, threads=1, latency_batch=1)
    wall = time.perf_counter() - start
    setting = latency.LatencySetting(threads=1, batch=1, warmup=20, runs=runs)
    before, (after,) = latency.time_against(load_model(path), [pruned], setting)
    got = report.latency
    return {"model": Path(path).name, "requested": speedup,
            "in_run": got["measured"]["speedup"], "measured": before / after,
            "before_ms": before, "after_ms": after, "plans": len(got["attempts"]),
            "table": got["table"]["source"], "plan": plan_text(report.removed),
            "wall": wall}


def table(rows: list[dict]) -> str:
    lines = ["| model | requested | in-run | measured | error | original ms | pruned ms "
             "| plans | table | units removed | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error = r["measured"] / r["requested"] - 1
        lines.append(
            f"| {r['model']} | {r['requested']:.2f}x | {r['in_run']:.3f}x | "
            f"{r['measured']:.3f}x | {error:+.1%} | {r['before_ms']:.3f} | "
            f"{r['after_ms']:.3f} | {r['plans']} | {r['table']} | {r['plan']} | "
            f"{r['wall']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    parser.add_argument("--runs", type=int, default=200,
                        help="timed runs of each model in the check after the run")
    parser.add_argument("--cache", metavar="DIR",
                        help="latency-table cache folder (default: a fresh temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as fresh:
        os.environ[latency.CACHE_ENV] = args.cache or fresh
        rows = []
        for name in args.models:
            for speedup in args.speedups:
                rows.append(one_run(name, speedup, args.runs))
                print(f"done {name} {speedup}x", file=sys.stderr, flush=True)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"ONNX Runtime CPU, batch 1, 1 thread; load average {load} "
          f"({os.cpu_count()} cores)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
