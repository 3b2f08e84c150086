"""Issue 16.5: wall time of scoring one calibration set in one process vs on a local Ray cluster
of N workers (default 2), and whether the scores are bit-identical. Prints a markdown table.

    python tools/bench_ray.py                                   # fisher, both models below
    python tools/bench_ray.py --models patchtst_etth1 --samples 256 --workers 2

Per model: the calibration windows of ETTh1's train split (``--samples``, seeded), batches of
``--batch-size``, the model's own task loss. The data, the analysis and the original's
outputs are prepared once, outside the timings; each timing is ``compute_scores`` alone.
Columns: one process with every ORT thread (``--threads 0``, the default) and with one
thread; Ray with N workers of one thread each, first call (worker processes start, each
analyses the model and builds its gradient graph and session) and second call (workers
warm, but the graph and session are built again: a call is one scoring step); the bytes the
driver reduced (per-batch sums and sketch rows); whether every score, signed estimate and
gradient sketch equals the one-process run's. The Ray cluster's own start (``ray.init``) is
printed apart, and per model a worker's one-off start s₀ and the cost of a batch c_b (one
thread), with the ideal time of N workers on N free cores, s₀ + ⌈batches / N⌉·c_b: the gap
to the measured time is the cores not free. Expect less than N× on N cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxprune.api import inspect  # noqa: E402
from onnxprune.batches import LossBatches  # noqa: E402
from onnxprune.data import load_or_synthesise  # noqa: E402
from onnxprune.losses import choose_loss  # noqa: E402
from onnxprune.modelio import load_model  # noqa: E402
from onnxprune.scores import check_method, compute_scores  # noqa: E402
from onnxprune.scores.distributed import RayCluster  # noqa: E402
from onnxprune.scores.gradient import GradientPass  # noqa: E402
from onnxprune.shapes import analysis_shapes, complete_shapes, input_specs  # noqa: E402
from onnxprune.structure.discover import analyse  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ETTh1.csv"
SAMPLES = {"patchtst_etth1": 2048, "tsfm_small": 512}
REDUCED = [0]   # bytes of the per-batch contributions the driver added


def _counting(gradient_sums):
    def wrapped(self, *args, **kwargs):
        for part in gradient_sums(self, *args, **kwargs):
            REDUCED[0] += part.nbytes()
            yield part
    return wrapped


RayCluster.gradient_sums = _counting(RayCluster.gradient_sums)


def identical(one, two) -> bool:
    same = one.values.keys() == two.values.keys() and one.gradients.keys() == two.gradients.keys()
    same = same and all(np.array_equal(one.values[k], two.values[k]) for k in one.values)
    same = same and all(np.array_equal(one.signed[k], two.signed[k]) for k in one.signed)
    return same and all(np.array_equal(getattr(one.gradients[k], a), getattr(two.gradients[k], a))
                        for k in one.gradients for a in ("mean", "square", "rows"))


def costs(analysis, spec, kinds, batches) -> tuple[float, float]:
    """A worker's one-off cost (analysis from the model's bytes, gated model, gradient graph
    and session: the first batch less a batch) and the cost of a batch, one thread."""
    start = time.perf_counter()
    model = onnx.load_from_string(analysis.model.SerializeToString())
    grad = GradientPass(analyse(model, dict(analysis.structure.input_shapes)), spec, kinds, 1)
    grad(*batches[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    more = batches[1:4] or batches[:1]
    for inputs, targets in more:
        grad(inputs, targets)
    per_batch = (time.perf_counter() - start) / len(more)
    return max(first - per_batch, 0.0), per_batch


def bench(name: str, samples: int, args) -> dict:
    model = load_model(ROOT / "models" / f"{name}.onnx")
    shapes = complete_shapes(input_specs(model), None)
    data = load_or_synthesise(model, str(args.data), samples, args.seed, shapes)
    analysis = inspect(model, analysis_shapes(input_specs(model), data.inputs, shapes))
    spec = choose_loss(model, data.targets, None)
    batches = LossBatches(model, data, spec, args.batch_size, 0, args.seed)
    kinds = check_method(args.method, "auto")

    def timed(**options):
        start = time.perf_counter()
        scores = compute_scores(analysis, batches, spec, args.method, kinds, seed=args.seed,
                                **options)
        return scores, time.perf_counter() - start

    row = {"model": name, "samples": data.n_samples, "batches": len(batches())}
    row["setup"], row["per_batch"] = costs(analysis, spec, kinds, batches.gradient_batches())
    shard = -(-row["batches"] // args.workers)
    row["ideal"] = row["setup"] + shard * row["per_batch"]
    one, row["one"] = timed(threads=0)
    _, row["one_1t"] = timed(threads=1)
    REDUCED[0] = 0
    first, row["ray_first"] = timed(workers=args.workers)
    row["reduced_mb"] = REDUCED[0] / 2 ** 20
    second, row["ray"] = timed(workers=args.workers)
    row["identical"] = identical(one, first) and identical(one, second)
    row["units"] = sum(int(np.size(v)) for v in one.values.values())
    print(f"  {name}: {row}", file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SAMPLES), choices=list(SAMPLES))
    parser.add_argument("--samples", type=int, help="windows per model (default: "
                        + ", ".join(f"{k} {v}" for k, v in SAMPLES.items()) + ")")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--method", default="fisher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    started = time.perf_counter() - start
    rows = [bench(name, args.samples or SAMPLES[name], args) for name in args.models]
    ray.shutdown()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.method}, batches of {args.batch_size}, {os.cpu_count()} CPU cores (load "
          f"average at the end {load}); local Ray cluster start (ray.init): {started:.1f} s, "
          "not in the timings\n")
    w = args.workers
    print(f"| model | windows (batches) | units | 1 process, all threads | 1 process, 1 thread "
          f"| Ray {w} workers, 1st call | Ray {w} workers, 2nd call | speed-up (2nd call) vs "
          f"all threads / 1 thread | reduced | identical | worker start s₀, batch c_b | "
          f"ideal on {w} free cores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['samples']} ({r['batches']}) | {r['units']} "
              f"| {r['one']:.1f} s | {r['one_1t']:.1f} s | {r['ray_first']:.1f} s "
              f"| {r['ray']:.1f} s | {r['one'] / r['ray']:.2f}× / {r['one_1t'] / r['ray']:.2f}× "
              f"| {r['reduced_mb']:.1f} MiB "
              f"| {'yes' if r['identical'] else 'NO'} | {r['setup']:.1f} s, "
              f"{r['per_batch']:.2f} s | {r['ideal']:.1f} s |")


if __name__ == "__main__":
    main()
