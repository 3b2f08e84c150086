"""The deployment benchmark: ``onnxprune bench``; in Python ``onnxprune.bench(models, ...)``
(the module is callable: it runs :func:`bench`) returns a list of :class:`BenchRow`.

For every model × batch × thread count: latency percentiles and mean, throughput, file size,
parameters and FLOPs at that batch, the peak resident memory of a process that loads and
runs the model, and ratios against the first model at the same batch and threads.

How it measures:

- sessions use what a deployment would: graph optimisation level ALL, ``intra_op`` threads
  pinned to the thread count, ``inter_op`` 1, sequential execution;
- inputs are synthetic (:func:`onnxprune.runtime.synthetic_feeds`): normal floats, zeros
  for ids, ones for masks; dynamic dims other than the batch come from ``shapes``, else 1;
- after ``warmup`` untimed runs of each model, the ``runs`` timed runs are interleaved
  round-robin (one run of model A, one of B, one of A, ...), so machine noise hits every
  model alike; each run is timed on its own (``time.perf_counter`` around ``session.run``);
- memory: a fresh child process per model × batch × threads (only numpy and onnxruntime
  imported) reads its resident set (``/proc/self/status`` VmRSS) after building the inputs,
  then loads the model, creates the session, runs it three times and reads its high-water
  mark (VmHWM; ``getrusage`` ``ru_maxrss`` where ``/proc`` is missing). ``peak_rss_mb`` is
  that high-water mark (the whole process: interpreter, ONNX Runtime, weights, arena,
  activations); ``model_rss_mb`` is its increase over the resident set before loading the
  model. Host memory only: with CUDA, device memory is not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxprune.callable_module import make_callable
from onnxprune.errors import OnnxpruneError
from onnxprune.modelio import load_model
from onnxprune.outputs import save_figure
from onnxprune.runtime import ort_message, synthetic_feeds
from onnxprune.shapes import InputSpec, batch_shapes, input_specs
from onnxprune.structure.cost import model_flops, model_params
from onnxprune.structure.graph import GraphView
from onnxprune.tracing import trace

__all__ = ["PROVIDERS", "BenchRow", "bench", "measure", "resolve_provider", "rows_json"]

PROVIDERS = ("cpu", "cuda", "auto")
_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MEMORY_RUNS = 3


@dataclass
class BenchRow:
    """One model at one batch size and thread count. Latencies in milliseconds; ratios
    against the first model at the same batch and threads (1.0 on its own rows)."""

    model: str
    batch: int
    threads: int
    provider: str
    warmup: int
    runs: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    latency_min_ms: float
    latency_std_ms: float
    throughput: float  # samples per second: batch / mean latency
    file_bytes: int  # the .onnx file plus its external data files
    params: int
    flops: int  # at this batch
    peak_rss_mb: float
    model_rss_mb: float
    speedup: float  # first model's p50 latency / this p50 latency
    speedup_mean: float  # the same with mean latencies
    size_ratio: float  # file_bytes / first model's
    params_ratio: float
    flops_ratio: float  # flops / first model's
    ideal_speedup: float  # 1 / flops_ratio: what the FLOPs promise
    efficiency: float  # speedup / ideal_speedup


def resolve_provider(provider: str) -> str:
    """``cpu``/``cuda``/``auto`` → the ONNX Runtime provider name; raises for ``cuda``
    when this onnxruntime build has no CUDA."""
    if provider not in PROVIDERS:
        raise OnnxpruneError(f"--provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    have = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if _ORT_NAMES["cuda"] in have else "cpu"
    if _ORT_NAMES[provider] not in have:
        raise OnnxpruneError(
            f"--provider {provider}: this onnxruntime ({ort.__version__}) has no "
            f"{_ORT_NAMES[provider]} (available: {', '.join(have)}); install onnxruntime-gpu "
            f"with a matching CUDA, or use --provider cpu")
    return _ORT_NAMES[provider]


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def provider_list(provider: str) -> list[str]:
    """The providers a session gets for ``provider``: it, then the CPU as fallback."""
    return [provider] if provider == _ORT_NAMES["cpu"] else [provider, _ORT_NAMES["cpu"]]


def file_bytes(path: str | os.PathLike, model: onnx.ModelProto) -> int:
    """Size on disk: the file and every external data file it names."""
    folder = Path(path).parent
    total = Path(path).stat().st_size
    seen = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                extra = folder / entry.value
                if extra.is_file():
                    total += extra.stat().st_size
    return total


def measure(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None
            ) -> tuple[int, int]:
    """(parameters, FLOPs) of a model at the given input shapes (dynamic dims else 1)."""
    values = trace(model, synthetic_feeds(input_specs(model), shapes))
    view = GraphView(gs.import_onnx(model))
    return model_params(view), model_flops(view, values)


@dataclass
class _Model:
    path: str
    proto: onnx.ModelProto
    specs: list[InputSpec]
    size: int


def _check_counts(name: str, values: Sequence[int], minimum: int) -> list[int]:
    values = [int(v) for v in values]
    if not values:
        raise OnnxpruneError(f"{name}: give at least one value")
    bad = [v for v in values if v < minimum]
    if bad:
        raise OnnxpruneError(f"{name}: {bad[0]} is not allowed (must be >= {minimum})")
    return list(dict.fromkeys(values))


def bench(
    models: Iterable[str | os.PathLike],
    batches: Iterable[int] = (1,),
    threads: Iterable[int] = (1,),
    provider: str = "cpu",
    warmup: int = 10,
    runs: int = 100,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    memory: bool = True,
    progress=None,
) -> list[BenchRow]:
    """Benchmark ``models`` (paths) at every batch × thread count; rows are ordered by
    thread count, then batch, then model (the order given). ``memory=False`` skips the
    child processes (memory fields 0). ``progress(message)`` is told what runs."""
    models = list(models)
    if not models:
        raise OnnxpruneError("bench needs at least one model")
    batches = _check_counts("--batch", batches, 1)
    threads = _check_counts("--threads", threads, 1)
    if int(warmup) < 0:
        raise OnnxpruneError(f"--warmup {warmup}: must be >= 0")
    if int(runs) < 1:
        raise OnnxpruneError(f"--runs {runs}: must be >= 1")
    ort_provider = resolve_provider(provider)
    say = progress or (lambda message: None)

    loaded = []
    for path in models:
        proto = load_model(path)
        loaded.append(_Model(str(path), proto, input_specs(proto), file_bytes(path, proto)))
    # every shape is checked before anything runs
    feeds_shapes = {(i, b): batch_shapes(m.specs, b, shapes, m.path)
                    for i, m in enumerate(loaded) for b in batches}

    costs = {}
    for (i, b), shape in feeds_shapes.items():
        say(f"counting params and FLOPs of {loaded[i].path} at batch {b}")
        costs[i, b] = measure(loaded[i].proto, shape)

    mem = {}
    if memory:
        for t in threads:
            for b in batches:
                for i, m in enumerate(loaded):
                    say(f"peak memory of {m.path} (batch {b}, {t} thread(s))")
                    mem[i, b, t] = peak_memory(m, feeds_shapes[i, b], t, ort_provider)

    rows: list[BenchRow] = []
    for t in threads:
        sessions = [_session(m, t, ort_provider) for m in loaded]
        for b in batches:
            feeds = [synthetic_feeds(m.specs, feeds_shapes[i, b]) for i, m in enumerate(loaded)]
            say(f"timing {len(loaded)} model(s) at batch {b}, {t} thread(s): {warmup} warm-up "
                f"+ {runs} timed runs each, interleaved")
            times = interleaved_times(sessions, feeds, int(warmup), int(runs))
            group = []
            for i, m in enumerate(loaded):
                params, flops = costs[i, b]
                peak, delta = mem.get((i, b, t), (0.0, 0.0))
                group.append(_row(m, b, t, ort_provider, int(warmup), int(runs), times[i],
                                  params, flops, peak, delta))
            _ratios(group)
            rows.extend(group)
        del sessions
    return rows


def _session(m: _Model, threads: int, provider: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(m.path, session_options(threads),
                                    providers=provider_list(provider))
    except Exception as exc:  # onnxruntime raises several types
        raise OnnxpruneError(f"{m.path}: ONNX Runtime cannot load the model: "
                             f"{_first_line(exc)}") from exc


def interleaved_times(sessions: list[ort.InferenceSession], feeds: list[dict[str, np.ndarray]],
                 warmup: int, runs: int) -> list[np.ndarray]:
    """Seconds per run of each session; runs alternate between the sessions."""
    order = list(range(len(sessions)))
    try:
        for _ in range(warmup):
            for i in order:
                sessions[i].run(None, feeds[i])
        times = np.zeros((len(sessions), runs))
        clock = time.perf_counter
        for r in range(runs):
            for i in order:
                session, feed = sessions[i], feeds[i]
                t0 = clock()
                session.run(None, feed)
                times[i, r] = clock() - t0
    except Exception as exc:
        raise OnnxpruneError(f"ONNX Runtime failed to run a model: {_first_line(exc)}"
                             ) from exc
    return list(times)


def _row(m: _Model, batch: int, threads: int, provider: str, warmup: int, runs: int,
         seconds: np.ndarray, params: int, flops: int, peak: float, delta: float) -> BenchRow:
    ms = seconds * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    mean = float(ms.mean())
    return BenchRow(
        model=m.path, batch=batch, threads=threads, provider=provider, warmup=warmup,
        runs=runs, latency_p50_ms=p50, latency_p90_ms=p90, latency_p99_ms=p99,
        latency_mean_ms=mean, latency_min_ms=float(ms.min()), latency_std_ms=float(ms.std()),
        throughput=batch * 1e3 / mean if mean > 0 else float("inf"), file_bytes=m.size,
        params=int(params), flops=int(flops), peak_rss_mb=peak, model_rss_mb=delta,
        speedup=1.0, speedup_mean=1.0, size_ratio=1.0, params_ratio=1.0, flops_ratio=1.0,
        ideal_speedup=1.0, efficiency=1.0)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def _ratios(group: list[BenchRow]) -> None:
    first = group[0]
    for row in group:
        row.speedup = _ratio(first.latency_p50_ms, row.latency_p50_ms)
        row.speedup_mean = _ratio(first.latency_mean_ms, row.latency_mean_ms)
        row.size_ratio = _ratio(row.file_bytes, first.file_bytes)
        row.params_ratio = _ratio(row.params, first.params)
        row.flops_ratio = _ratio(row.flops, first.flops)
        row.ideal_speedup = _ratio(first.flops, row.flops)
        row.efficiency = _ratio(row.speedup, row.ideal_speedup)


def rows_json(rows: list[BenchRow]) -> dict:
    """Every field of every row, with the run's setting."""
    return {"onnxruntime": ort.__version__,
            "provider": rows[0].provider if rows else None,
            "fields": [f.name for f in fields(BenchRow)],
            "rows": [asdict(r) for r in rows]}


# --- peak memory in a child process ------------------------------------------------------

_CHILD = r"""
import json, os, sys
import numpy as np
import onnxruntime as ort

def status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)

job = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
feeds = {}
for name, dtype, shape, fill in job["inputs"]:
    if fill is None:
        feeds[name] = rng.standard_normal(shape).astype(dtype)
    else:
        feeds[name] = np.full(shape, fill, dtype=dtype)
before = status("VmRSS")
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
opts.intra_op_num_threads = job["threads"]
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.log_severity_level = 3
session = ort.InferenceSession(job["model"], opts, providers=job["providers"])
for _ in range(job["runs"]):
    session.run(None, feeds)
peak = status("VmHWM")
print(json.dumps({"peak": peak, "before": before}))
"""


def peak_memory(m: _Model, shapes: Mapping[str, tuple[int, ...]], threads: int,
                provider: str) -> tuple[float, float]:
    """(peak resident MB of a fresh process that loads and runs the model, its increase
    over the process before loading the model)."""
    inputs = []
    for spec in m.specs:
        dtype = np.dtype(spec.dtype).name
        if np.issubdtype(spec.dtype, np.floating):
            fill = None
        elif spec.dtype == np.bool_:
            fill = True
        else:
            fill = 1 if "mask" in spec.name.lower() else 0
        inputs.append((spec.name, dtype, list(shapes[spec.name]), fill))
    job = {"model": os.path.abspath(m.path), "threads": int(threads), "runs": MEMORY_RUNS,
           "providers": provider_list(provider), "inputs": inputs}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)],
                              capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise OnnxpruneError(f"{m.path}: the memory measurement did not finish in 900 s"
                             ) from None
    if done.returncode != 0:
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        raise OnnxpruneError(f"{m.path}: the memory measurement failed: "
                             f"{lines[-1] if lines else f'exit {done.returncode}'}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return round(result["peak"], 2), round(result["peak"] - result["before"], 2)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return ort_message(text[0]) if text else type(exc).__name__


# --- plot ---------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnnxpruneError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    return plt


def check_plot() -> None:
    """Raise now (before a long benchmark) when matplotlib is missing."""
    _pyplot()


def short_names(paths: Sequence[str]) -> list[str]:
    """File names, or the paths as given where two files share a name."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(set(paths)) else [str(p) for p in paths]


def plot_bench(rows: list[BenchRow], path: str) -> None:
    """Per batch size, its own column of axes: latency (p50, whisker p90) per model and
    thread count on top; below, each model's measured speed-up over the first model beside
    what its FLOPs promise (the FLOPs-ideal 1 / FLOPs ratio, a black tick)."""
    plt = _pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    names = short_names(models)
    batches = sorted({r.batch for r in rows})
    threads = sorted({r.threads for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches) + 1, 7),
                             squeeze=False)
    width = 0.8 / len(threads)
    x = np.arange(len(models))
    for col, batch in enumerate(batches):
        top, bottom = axes[0][col], axes[1][col]
        by = {(r.model, r.threads): r for r in rows if r.batch == batch}
        for k, t in enumerate(threads):
            got = [by.get((m, t)) for m in models]
            p50 = [r.latency_p50_ms if r else np.nan for r in got]
            err = [r.latency_p90_ms - r.latency_p50_ms if r else 0 for r in got]
            label = f"{t} thread{'s' if t > 1 else ''}"
            top.bar(x + k * width, p50, width, yerr=[[0] * len(err), err], capsize=3,
                    label=label)
            bottom.bar(x + k * width, [r.speedup if r else np.nan for r in got], width,
                       label=f"measured, {label}")
            bottom.scatter(x + k * width, [r.ideal_speedup if r else np.nan for r in got],
                           marker="_", s=400, color="black", zorder=3,
                           label="FLOPs-ideal" if k == 0 else None)
        bottom.axhline(1.0, color="grey", lw=0.8)
        for ax, title, unit in ((top, f"batch {batch}: latency (p50, whisker p90)", "ms"),
                                (bottom, f"batch {batch}: speed-up vs the first model",
                                 "× faster")):
            ax.set_xticks(x + width * (len(threads) - 1) / 2, names, rotation=15,
                          fontsize="small")
            ax.set_title(title, fontsize="medium")
            ax.set_ylabel(unit)
    axes[0][0].legend(fontsize="small")
    axes[1][0].legend(fontsize="small")
    fig.suptitle(f"onnxprune bench ({rows[0].provider}, {rows[0].runs} runs)")
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


make_callable(__name__, bench)
