"""Latency as a budget: ``--target latency --speedup S`` (or ``--latency-ms M``).

A latency table is measured in ONNX Runtime on the run's provider, threads and batch, as
Kwon et al. 2022 profile theirs: for each unit kind, k units are cut in every block of its
type for a few k (the real, verified cut), each model is timed interleaved with the original
(medians of the per-model times, so machine noise hits both alike), and the latency against
the kept width n is fitted piecewise-linearly, L(n) = base + slope · max(0, n − threshold):
flat below a threshold width, linear above it. Removing every attention (FFN) module gives
the latency of those modules; what no cut removes is the fixed latency.

The slope, divided by the FLOPs one width step removes, is the kind's milliseconds per FLOP;
a unit's cost for the search is that rate times the unit's FLOPs in its block, so blocks of
different sizes share one measured table. Tables are cached on disk (``ONNXPRUNE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/onnxprune``, else ``~/.cache/onnxprune``), keyed by the model's sha256,
provider, threads, batch, input shapes and unit kinds; an unreadable entry is re-measured.

A speed-up S asks the pruned model to run in T/S, T the original's time: the cut's graph
rewrite alone (nothing removed) runs in T_r, so T_r − T/S of block latency is removed. After
the cut the speed-up is measured (original and pruned timed interleaved); when it misses S
by more than 5 % the latency to remove is corrected by what the cut still runs above (or
below) T/S and the run is planned again (at most ``REFINEMENTS`` times); the closest run is
kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.bench import interleaved_times, provider_list, resolve_provider, session_options
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.input_roles import input_roles
from onnxprune.pipeline import Progress, PruneOptions, Report, run_prune
from onnxprune.plan import Selection, select, unit_costs
from onnxprune.runtime import synthetic_feeds
from onnxprune.scores import Scores, check_method
from onnxprune.shapes import analysis_shapes, batch_shapes, input_specs
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis, analyse
from onnxprune.surgery import apply_plan, cut_verified
from onnxprune.units import Plan, Unit, UnitKind, kinds_of, make_plan, module_kind

TOLERANCE = 0.05          # the measured speed-up may miss the request by this much
REFINEMENTS = 3           # re-plans after the first cut when it misses
TABLE_VERSION = 1         # bump when the table's meaning changes: old cache entries miss
CACHE_ENV = "ONNXPRUNE_CACHE_DIR"
WIDTH_FRACTIONS = (0.25, 0.5, 0.75)   # removed shares of a kind's width that are timed


@dataclass(frozen=True)
class LatencySetting:
    """Where latency is measured: an ONNX Runtime provider, intra-op threads (0: all
    cores), batch size, and the input shapes (their batch entry replaced by ``batch``)."""

    provider: str = "cpu"
    threads: int = 0
    batch: int = 1
    shapes: Mapping[str, tuple[int, ...]] | None = None
    warmup: int = 3
    runs: int = 20

    def feeds(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        specs = input_specs(model)
        shapes = batch_shapes(specs, self.batch, self.shapes, "--latency-batch")
        return synthetic_feeds(specs, shapes, seed=0, roles=input_roles(model))

    def cache_key(self, model: onnx.ModelProto, kinds: list[str]) -> dict:
        """Everything a table depends on (the model by its sha256)."""
        specs = input_specs(model)
        shapes = batch_shapes(specs, self.batch, self.shapes, "--latency-batch")
        return {"version": TABLE_VERSION, "onnxruntime": ort.__version__,
                "model": hashlib.sha256(model.SerializeToString()).hexdigest(),
                "provider": resolve_provider(self.provider), "threads": self.threads,
                "batch": self.batch, "shapes": {k: list(v) for k, v in sorted(shapes.items())},
                "kinds": sorted(kinds)}


# --- the piecewise-linear fit ------------------------------------------------------------

@dataclass
class Hinge:
    """L(n) = base + slope · max(0, n − threshold): flat at ``base`` up to width
    ``threshold``, rising by ``slope`` per unit of width above it."""

    base: float
    slope: float
    threshold: float

    def __call__(self, width: float) -> float:
        return self.base + self.slope * max(0.0, width - self.threshold)


def fit_hinge(widths: list[float], latencies: list[float]) -> Hinge:
    """Least-squares hinge through (kept width, latency) points: every measured width is
    tried as the threshold (the smallest one meaning a plain line); the slope is never
    negative. Ties go to the lowest threshold."""
    n = np.asarray(widths, dtype=np.float64)
    y = np.asarray(latencies, dtype=np.float64)
    if len(n) < 2:
        raise OnnxpruneError("a latency fit needs at least two timed widths")
    best: tuple[float, Hinge] | None = None
    for t in np.unique(n)[:-1]:
        x = np.maximum(0.0, n - t)
        (base, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
        if slope < 0:
            base, slope = float(y.mean()), 0.0
        err = float(np.sum((base + slope * x - y) ** 2))
        if best is None or err < best[0] - 1e-12 * max(1.0, float(np.sum(y ** 2))):
            best = (err, Hinge(float(base), float(slope), float(t)))
    return best[1]


# --- the table ---------------------------------------------------------------------------

@dataclass
class KindRate:
    """One unit kind's measured latency: milliseconds per FLOP removed (in the linear part
    of the fit), the threshold as a share of the width, and the timed points."""

    kind: str
    ms_per_flop: float
    threshold: float = 0.0
    points: list[tuple[int, float]] = field(default_factory=list)   # (kept width, ms)


@dataclass
class LatencyTable:
    """A model's latency at one setting and, per unit kind, what cutting it saves.
    ``rewritten_ms`` is the model through the cut's graph rewrite with nothing removed (the
    rewrite alone can change the time: it drops the declared intermediate shapes); savings
    are measured from it."""

    full_ms: float
    rewritten_ms: float
    rates: dict[str, KindRate]
    default_ms_per_flop: float      # for kinds not measured: the whole model's average
    key: dict = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "measured"        # or "cached"

    def rate(self, block: Block, kind: UnitKind) -> float:
        """Milliseconds per FLOP for ``kind`` in ``block`` (its module's rate when the
        kind was not measured)."""
        found = self.rates.get(kind.key) or self.rates.get(module_kind(block).key)
        return found.ms_per_flop if found else self.default_ms_per_flop

    def costs(self, analysis: Analysis) -> dict[str, dict[str, float]]:
        """Milliseconds one unit of each kind removes, by block and kind key (the table the
        search takes instead of parameters or FLOPs)."""
        out = {}
        for block in analysis.structure.blocks:
            flops = unit_costs(analysis, block, "flops")
            out[block.name] = {kind.key: flops[kind.key] * self.rate(block, kind)
                               for kind in kinds_of(block) if kind.key in flops}
        return out

    def total(self, analysis: Analysis) -> float:
        """Milliseconds the attention and FFN blocks take (what a latency budget is a share
        of)."""
        return float(sum(b.flops * self.rate(b, module_kind(b))
                         for b in analysis.structure.blocks))

    def to_json(self) -> dict:
        return {"full_ms": self.full_ms, "rewritten_ms": self.rewritten_ms,
                "default_ms_per_flop": self.default_ms_per_flop,
                "rates": {k: asdict(r) for k, r in self.rates.items()}, "key": self.key,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> LatencyTable:
        rates = {k: KindRate(r["kind"], float(r["ms_per_flop"]), float(r["threshold"]),
                             [(int(w), float(ms)) for w, ms in r["points"]])
                 for k, r in data["rates"].items()}
        return cls(float(data["full_ms"]), float(data["rewritten_ms"]), rates,
                   float(data["default_ms_per_flop"]),
                   dict(data["key"]), float(data.get("seconds", 0.0)), "cached")


# --- timing ------------------------------------------------------------------------------

def _session(model: onnx.ModelProto, setting: LatencySetting) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model.SerializeToString(),
                                    session_options(setting.threads),
                                    providers=provider_list(resolve_provider(setting.provider)))
    except Exception as exc:  # onnxruntime raises several types
        raise OnnxpruneError(f"ONNX Runtime cannot load a model to time: "
                             f"{str(exc).splitlines()[0] if str(exc) else exc}") from exc


def time_against(reference: onnx.ModelProto, others: list[onnx.ModelProto],
                 setting: LatencySetting) -> tuple[float, list[float]]:
    """(median ms of ``reference``, median ms of each other model). Runs go round-robin
    (reference, other 1, other 2, ...) so that load on the machine hits all alike; each
    other model's time is the median of its per-round ratio to the reference times the
    reference's median."""
    models = [reference, *others]
    times = interleaved_times([_session(m, setting) for m in models],
                              [setting.feeds(m) for m in models], setting.warmup,
                              setting.runs)
    full = float(np.median(times[0])) * 1e3
    return full, [full * float(np.median(t / times[0])) for t in times[1:]]


# --- measuring a table -------------------------------------------------------------------

@dataclass
class _Variant:
    """One timed cut: ``units`` removed, leaving ``width`` of the kind in every block, which
    removes ``flops``."""

    kind: UnitKind
    width: int
    full: int       # the kind's width before the cut
    units: list[Unit]
    flops: float


def _uniform_units(kind: UnitKind, block: Block, removed: int) -> list[Unit]:
    """The first ``removed`` entries along the kind's last axis, in every head."""
    shape = kind.shape(block)
    return [Unit(kind, block.name, (*head, c)) for head in np.ndindex(*shape[:-1])
            for c in range(removed)]


def _variants(analysis: Analysis, kind: UnitKind) -> list[_Variant]:
    blocks = [b for b in analysis.structure.blocks if kind.fits(b) and kind.refusal(b) is None]
    if not blocks:
        return []
    if kind.whole:
        return [_Variant(kind, 0, 0, [Unit(kind, b.name) for b in blocks],
                         float(sum(b.flops for b in blocks)))]
    width = min(kind.shape(b)[-1] for b in blocks)
    steps = sorted({min(width - 1, max(1, round(width * f))) for f in WIDTH_FRACTIONS}
                   | {width - 1})
    out = []
    for removed in (k for k in steps if 0 < k < width):
        units = [u for b in blocks for u in _uniform_units(kind, b, removed)]
        flops = sum(unit_costs(analysis, b, "flops")[kind.key]
                    * len(_uniform_units(kind, b, removed)) for b in blocks)
        out.append(_Variant(kind, width - removed, width, units, float(flops)))
    return out


def _cut(analysis: Analysis, units: list[Unit]) -> onnx.ModelProto | None:
    """The verified cut, or None where the constraints refuse this uniform cut."""
    try:
        return cut_verified(analysis, make_plan(units, analysis.structure))[0]
    except OnnxpruneError:
        return None


def measure_table(model: onnx.ModelProto, analysis: Analysis, kinds: set[UnitKind],
                  setting: LatencySetting) -> LatencyTable:
    """Time the model and its uniform cuts of every kind in ``kinds`` (and of every module
    kind, whose rates give the prunable total) and fit each kind's rate."""
    start = time.perf_counter()
    wanted = {k for b in analysis.structure.blocks for k in kinds_of(b)
              if k in kinds or k.whole}
    full_ms, (base_ms,) = time_against(model, [apply_plan(analysis, Plan({}, []))], setting)
    by_kind: dict[str, list[tuple[_Variant, float]]] = {}
    for kind in sorted(wanted, key=lambda k: k.key):
        for variant in _variants(analysis, kind):
            cut = _cut(analysis, variant.units)
            if cut is not None:   # one cut in memory at a time, each timed A/B
                reference, (ms,) = time_against(model, [cut], setting)
                by_kind.setdefault(kind.key, []).append((variant, ms * full_ms / reference))
    rates = {key: _rate(points, base_ms) for key, points in by_kind.items()}
    flops = analysis.structure.flops
    return LatencyTable(full_ms, base_ms, rates, base_ms / flops if flops else 0.0,
                        seconds=time.perf_counter() - start)


def _rate(points: list[tuple[_Variant, float]], base_ms: float) -> KindRate:
    """A kind's ms per FLOP: modules by their one cut, other kinds by the hinge fit through
    the rewritten model at full width and the timed cuts."""
    first = points[0][0]
    if first.kind.whole:
        return KindRate(first.kind.key, max(0.0, base_ms - points[0][1]) / first.flops,
                        0.0, [(0, points[0][1])])
    width = first.full
    widths = [width] + [v.width for v, _ in points]
    fit = fit_hinge(widths, [base_ms] + [ms for _, ms in points])
    flops_per_step = first.flops / (width - first.width)
    return KindRate(first.kind.key, fit.slope / flops_per_step, fit.threshold / width,
                    [(width, base_ms)] + [(v.width, ms) for v, ms in points])


# --- the cache ---------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "onnxprune"


def _cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"latency-{digest[:32]}.json"


def load_cached(key: dict) -> LatencyTable | None:
    """The cached table for ``key``; None when absent, unreadable or for another key."""
    try:
        table = LatencyTable.from_json(json.loads(_cache_path(key).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return table if table.key == key else None


def store(table: LatencyTable) -> None:
    """Write the table to the cache atomically; a cache that cannot be written is skipped."""
    path = _cache_path(table.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latency-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(table.to_json(), f)
        os.replace(tmp, path)
    except OSError:
        pass


def latency_table(model: onnx.ModelProto, analysis: Analysis, kinds: set[UnitKind],
                  setting: LatencySetting) -> LatencyTable:
    """The cached table for this model and setting, or a fresh measurement (then cached)."""
    key = setting.cache_key(model, [k.key for k in kinds])
    cached = load_cached(key)
    if cached is not None:
        return cached
    table = measure_table(model, analysis, kinds, setting)
    table.key = key
    store(table)
    return table


# --- the search, with the table as its cost ----------------------------------------------

@dataclass
class LatencyCosts:
    """The cost model a latency-target run hands the pipeline: the table's per-unit
    milliseconds and prunable total in place of parameters or FLOPs."""

    table: LatencyTable

    def total(self, analysis: Analysis) -> float:
        return self.table.total(analysis)

    def select(self, analysis: Analysis, scores: Scores, kinds: set[UnitKind], budget: float,
               round_to: int = 1) -> Selection:
        return select(analysis, scores, kinds, budget, target="latency", round_to=round_to,
                      costs=self.table.costs(analysis))


# --- the run -----------------------------------------------------------------------------

def requested_speedup(opts: PruneOptions, full_ms: float) -> float:
    """The speed-up the options ask for (``--latency-ms`` as the original's time over it)."""
    if opts.speedup is not None:
        return opts.speedup
    if opts.latency_ms >= full_ms:
        raise OnnxpruneError(f"--latency-ms {opts.latency_ms}: the model already runs in "
                             f"{full_ms:.3g} ms here; nothing to prune")
    return full_ms / opts.latency_ms


def setting_of(opts: PruneOptions) -> LatencySetting:
    return LatencySetting(opts.latency_provider, opts.threads, opts.latency_batch, opts.shapes)


def prune_for_latency(model: onnx.ModelProto, calib: CalibrationData, opts: PruneOptions,
                      progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Prune to the requested speed-up: measure (or load) the latency table, plan with it,
    cut, measure, and re-plan while the measured speed-up misses by more than 5 %."""
    opts.check()
    opts.shapes = analysis_shapes(input_specs(model), calib.inputs, opts.shapes)
    kinds = check_method(opts.method, opts.granularity)
    analysis = analyse(model, opts.shapes)
    setting = setting_of(opts)
    table = latency_table(model, analysis, kinds, setting)
    costs = LatencyCosts(table)
    speedup = requested_speedup(opts, table.full_ms)
    prunable = costs.total(analysis)
    remove = _to_remove(table, speedup, prunable)
    attempts: list[dict] = []
    best: tuple[float, int, onnx.ModelProto, Report] | None = None
    for _ in range(REFINEMENTS + 1):
        ratio = min(remove / prunable, 0.99)
        pruned, report = run_prune(model, calib, replace(opts, ratio=ratio, costs=costs),
                                   progress)
        before_ms, (after_ms,) = time_against(model, [pruned], replace(setting, runs=50))
        measured = before_ms / after_ms
        attempts.append({"planned_ms": round(remove, 4), "ratio": round(ratio, 4),
                         "before_ms": round(before_ms, 4), "after_ms": round(after_ms, 4),
                         "speedup": round(measured, 4)})
        miss = abs(measured - speedup) / speedup
        if best is None or miss < best[0]:
            best = (miss, len(attempts) - 1, pruned, report)
        if miss <= TOLERANCE or ratio >= 0.99:
            break
        # what the cut still runs above (or below) the request, in the table's milliseconds
        remove += table.full_ms * (1 / measured - 1 / speedup)
        remove = max(remove, 0.01 * prunable)
    _, chosen, pruned, report = best
    report.latency = _summary(opts, speedup, table, setting, attempts, attempts[chosen])
    return pruned, report


def _to_remove(table: LatencyTable, speedup: float, prunable: float) -> float:
    """Milliseconds of blocks to remove from the rewritten model to run in full / S; at
    least 1 % of the blocks where the rewrite alone is already fast enough (a run always
    removes something)."""
    remove = table.rewritten_ms - table.full_ms / speedup
    if remove >= prunable:
        best = table.full_ms / max(table.rewritten_ms - prunable, 1e-9)
        raise OnnxpruneError(
            f"--speedup {speedup:.3g} cannot be reached: the attention and FFN blocks take "
            f"{prunable:.3g} of the model's {table.full_ms:.3g} ms here, so even removing "
            f"all of them gives at most {best:.2f}x")
    return max(remove, 0.01 * prunable)


def _summary(opts: PruneOptions, speedup: float, table: LatencyTable,
             setting: LatencySetting, attempts: list[dict], final: dict) -> dict:
    """The report's ``latency`` entry."""
    return {"requested_speedup": round(speedup, 4), "requested_ms": opts.latency_ms,
            "measured": {"before_ms": final["before_ms"], "after_ms": final["after_ms"],
                         "speedup": final["speedup"]},
            "error": round(final["speedup"] / speedup - 1, 4),
            "within_tolerance": abs(final["speedup"] / speedup - 1) <= TOLERANCE,
            "table": {"source": table.source, "seconds": round(table.seconds, 2),
                      "full_ms": round(table.full_ms, 4),
                      "rewritten_ms": round(table.rewritten_ms, 4),
                      "ms_per_gflop": {k: round(r.ms_per_flop * 1e9, 4)
                                       for k, r in table.rates.items()},
                      "threshold": {k: round(r.threshold, 3) for k, r in table.rates.items()}},
            "setting": {"provider": resolve_provider(setting.provider),
                        "threads": setting.threads, "batch": setting.batch},
            "attempts": attempts}
