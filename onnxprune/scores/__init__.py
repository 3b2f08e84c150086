"""The score stage: a sensitivity per prunable unit, higher = more important to keep.

Every method fills arrays keyed by (block, kind): "module" [], "head" [H], "qk" [H, dqk],
"vo" [H, dvo], "ch" [F]. Gradient methods are in gradient.py, ``ablation`` in ablation.py,
``stat`` in activations.py, ``magnitude`` and ``random`` in weights.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onnxprune.autodiff import NoGradientError
from onnxprune.errors import OnnxpruneError
from onnxprune.scores.ablation import ablation
from onnxprune.scores.activations import stat
from onnxprune.scores.gradient import GradientPass, GradientStatistic
from onnxprune.scores.weights import magnitude, random_scores
from onnxprune.structure.discover import Analysis
from onnxprune.units import channel_unit, ffn_channel_unit, head_unit

METHODS = ("fisher", "taylor", "send", "ablation", "stat", "magnitude", "random")
GRANULARITIES = ("auto", "module", "head", "channel", "ffn")
# unit kinds each granularity prunes ("attn" / "ffn" = whole attention / FFN modules)
GRANULARITY_KINDS = {
    "module": {"attn"},
    "head": {"head"},
    "channel": {"qk", "vo"},
    "ffn": {"ch"},
    "auto": {"attn", "ffn", "head", "ch"},
}
METHOD_KINDS = {
    "fisher": {"attn", "ffn", "head", "qk", "vo", "ch"},
    "taylor": {"attn", "ffn", "head", "qk", "vo", "ch"},
    "send": {"attn"},
    "ablation": {"attn", "ffn", "head"},
    "stat": {"attn", "ffn", "head", "qk", "vo", "ch"},
    "magnitude": {"attn", "ffn", "head", "qk", "vo", "ch"},
    "random": {"attn", "ffn", "head", "qk", "vo", "ch"},
}
UnitArrays = dict[tuple[str, str], np.ndarray]
Batches = Callable[[], list[tuple[dict, dict]]]


@dataclass
class Scores:
    method: str
    values: UnitArrays
    samples: int
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)

    def units(self) -> dict[str, float]:
        """Every scored unit by name (DESIGN.md unit names)."""
        out: dict[str, float] = {}
        for (block, kind), value in self.values.items():
            value = np.asarray(value, dtype=np.float64)
            if kind == "module":
                out[block] = float(value)
            elif kind == "head":
                out.update({head_unit(block, h): float(v) for h, v in enumerate(value)})
            elif kind in ("qk", "vo"):
                for (h, c), v in np.ndenumerate(value):
                    out[channel_unit(block, kind, h, c)] = float(v)
            elif kind == "ch":
                out.update({ffn_channel_unit(block, c): float(v) for c, v in enumerate(value)})
        return out


def check_method(method: str, granularity: str) -> set[str]:
    """The unit kinds to score; raise when the method cannot score the granularity."""
    if method not in METHODS:
        raise OnnxpruneError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if granularity not in GRANULARITIES:
        raise OnnxpruneError(f"--granularity {granularity!r}: choose one of "
                             f"{', '.join(GRANULARITIES)}")
    wanted = GRANULARITY_KINDS[granularity]
    kinds = wanted & METHOD_KINDS[method]
    if (granularity != "auto" and kinds != wanted) or not kinds:
        usable = [g for g in GRANULARITIES if GRANULARITY_KINDS[g] <= METHOD_KINDS[method]]
        raise OnnxpruneError(f"--method {method} does not score --granularity {granularity} "
                             f"units; with {method} use {', '.join(usable)}")
    return kinds


def gate_kinds(kinds: set[str]) -> set[str]:
    return {"module" if k in ("attn", "ffn") else k for k in kinds}


def compute_scores(analysis: Analysis, batches: Batches, spec, method: str, kinds: set[str],
                   *, ema: float = 0.5, seed: int = 0, threads: int = 0,
                   progress=None) -> Scores:
    """Scores of ``method`` for the unit kinds ``kinds`` over the calibration batches."""
    start = time.perf_counter()
    fallbacks: list[str] = []
    gates = gate_kinds(kinds)
    if method in ("fisher", "taylor", "send"):
        try:
            values, samples = _gradient_scores(analysis, batches, spec, method, gates, ema,
                                               threads, progress)
        except NoGradientError as exc:
            if method == "send":
                raise
            fallbacks.append(f"{method} -> ablation (modules, heads) and stat (channels): {exc}")
            values = _forward_fallback(analysis, batches, spec, gates, threads, progress)
            samples = sum(len(next(iter(i.values()))) for i, _ in batches())
    elif method == "ablation":
        values, _ = ablation(analysis, spec, batches, gates, threads, progress)
        samples = sum(len(next(iter(i.values()))) for i, _ in batches())
    elif method == "stat":
        values = stat(analysis, batches, gates, threads)
        samples = sum(len(next(iter(i.values()))) for i, _ in batches())
    elif method == "magnitude":
        values, samples = magnitude(analysis), 0
    else:
        values, samples = random_scores(analysis, seed), 0
    values = _restrict(analysis, values, kinds)
    return Scores(method, values, samples, time.perf_counter() - start, fallbacks)


def _gradient_scores(analysis, batches, spec, method, gates, ema, threads, progress):
    if method == "send":
        gates = {"send"}
        missing = [b.name for b in analysis.structure.attention
                   if analysis.view.node[b.anchor].op != "Softmax"]
        if missing:
            raise OnnxpruneError(f"--method send needs the softmax of each attention; "
                                 f"{', '.join(missing)} use a fused Attention op")
    grad = GradientPass(analysis, spec, gates, threads)
    acc = GradientStatistic(method, ema, first_order=not spec.distill)
    data = getattr(batches, "gradient_batches", batches)()
    for n, (inputs, targets) in enumerate(data):
        _, grads = grad(inputs, targets)
        acc.update(grads)
        if progress:
            progress(n + 1, len(data))
    values: UnitArrays = {}
    blocks = {b.name: b for b in analysis.structure.blocks}
    for gate, value in acc.result().items():
        kind = "module" if gate.kind == "send" else gate.kind
        if gate.kind in ("qk", "vo"):
            value = value.reshape(blocks[gate.block].heads, gate.width)
        values[(gate.block, kind)] = value if gate.size else np.float64(value)
    return values, acc.count


def _forward_fallback(analysis, batches, spec, gates, threads, progress) -> UnitArrays:
    values = stat(analysis, batches, gates & {"qk", "vo", "ch"}, threads)
    if gates & {"module", "head"}:
        ablated, _ = ablation(analysis, spec, batches, gates, threads, progress)
        values.update(ablated)
    return values


def _restrict(analysis: Analysis, values: UnitArrays, kinds: set[str]) -> UnitArrays:
    """Only the kinds asked for; module scores only for blocks that can be removed whole."""
    out: UnitArrays = {}
    for (block_name, kind), value in values.items():
        block = analysis.structure.block(block_name)
        if kind == "module":
            wanted = "attn" if block.kind == "attention" else "ffn"
            if wanted in kinds and block.removable:
                out[(block_name, kind)] = value
        elif kind in kinds:
            out[(block_name, kind)] = value
    return out
