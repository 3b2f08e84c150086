"""The exactness contract: cut(model)(x) == gated(model)(x, removed gates = 0), on random
inputs, for every output; plus onnx.checker (full) and an ONNX Runtime load.

"Exactly" means to float tolerance fitting the model's dtype (:func:`tolerance`): the cut
changes how many terms a MatMul sums, so outputs differ by rounding. The precision that
bounds that rounding is the least precise float type the model computes or returns in
(its inputs, outputs, weights, constants and Cast targets): a float16 model, or a float32
model whose weights are float16 (``keep_io_types``), computes in float16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx

from onnxprune.errors import OnnxpruneError, VerificationError
from onnxprune.gates import gate_model
from onnxprune.input_roles import input_roles
from onnxprune.memory import release_memory
from onnxprune.runtime import make_session, run, synthetic_feeds
from onnxprune.shapes import input_specs, verification_shapes
from onnxprune.structure.discover import Analysis
from onnxprune.units import Plan, block_roles
from onnxprune.units.removal import cut_cache
from onnxprune.weightstore import check_model as check_stubbed_model
from onnxprune.weightstore import tensor_array


@dataclass
class Verification:
    max_abs_diff: float
    max_rel_diff: float
    outputs: int
    batch: int | None
    rtol: float | None = None   # the tolerance the check used: |diff| <= atol + rtol·max|ref|
    atol: float | None = None
    inputs: dict[str, list[int]] | None = None   # the random inputs' shapes, by name
    seed: int = 0

    def to_json(self) -> dict:
        """The report's ``verified`` object."""
        return {"rtol": self.rtol, "atol": self.atol, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "outputs": self.outputs,
                "inputs": {"kind": "random", "seed": self.seed, "batch": self.batch,
                           "shapes": self.inputs or {}}}

    def __str__(self) -> str:
        return (f"exact: {self.outputs} output(s), max |diff| {self.max_abs_diff:.2e} "
                f"(relative {self.max_rel_diff:.2e})")


def check_model(model: onnx.ModelProto, what: str) -> None:
    try:
        check_stubbed_model(model, full_check=True)
    except Exception as exc:  # checker raises several types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"{what} fails onnx.checker: {message}") from exc


# float32 (and float64) models: the tolerance as it always was
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-5
# half precision: multiples of the type's machine epsilon (float16: rtol 1.6e-2, atol 3.9e-3
# of the largest output magnitude and absolute; bfloat16: 1.3e-1, 3.1e-2)
HALF_RTOL_EPS, HALF_ATOL_EPS = 16, 4

_FLOAT_TYPES = {
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BFLOAT16: None,       # no numpy type; epsilon 2**-7
}
_EPS = {np.float64: float(np.finfo(np.float32).eps), np.float32: float(np.finfo(np.float32).eps),
        np.float16: float(np.finfo(np.float16).eps), None: 2.0 ** -7}


def compute_precision(model: onnx.ModelProto) -> int:
    """The least precise float element type (TensorProto enum) among the model's inputs,
    outputs, initializers, Constant values and Cast targets (FLOAT when it has none)."""
    graph = model.graph
    found = {vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.output]}
    found |= {t.data_type for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                found.add(attr.t.data_type)
            elif node.op_type == "Cast" and attr.name == "to":
                found.add(attr.i)
    floats = [t for t in found if t in _FLOAT_TYPES]
    return max(floats, key=lambda t: _EPS[_FLOAT_TYPES[t]], default=onnx.TensorProto.FLOAT)


def check_tolerance(rtol: float | None, atol: float | None) -> None:
    """--rtol/--atol, where given, are finite and not negative."""
    for name, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise OnnxpruneError(f"{name} {value}: must be a finite number >= 0")


def tolerance(model: onnx.ModelProto) -> tuple[float, float]:
    """(rtol, atol) for comparing a cut of ``model`` with its gated original: 1e-4 and 1e-5
    for float32 models; ``HALF_RTOL_EPS`` and ``HALF_ATOL_EPS`` machine epsilons of the
    compute type for float16 and bfloat16 ones (:func:`compute_precision`). rtol scales the
    largest output magnitude."""
    elem = compute_precision(model)
    if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        return FLOAT32_RTOL, FLOAT32_ATOL
    eps = _EPS[_FLOAT_TYPES[elem]]
    return HALF_RTOL_EPS * eps, HALF_ATOL_EPS * eps


def _reference_run(analysis: Analysis, gated, plan: Plan, seed: int
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs and the gated original's outputs at the verification shapes (another batch
    than the analysis, to check that dynamic dims stay dynamic); at the analysed shapes when
    the original itself cannot run there (an export that baked a dynamic dim in)."""
    specs, session = input_specs(analysis.model), make_session(gated.model)
    analysed = analysis.structure.input_shapes

    def run_at(shapes: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        feeds = synthetic_feeds(specs, shapes, seed=seed, roles=input_roles(analysis.model))
        return feeds, run(session, {**feeds, **gated.feeds(plan)})

    other = verification_shapes(specs, analysed)
    try:
        return run_at(other)
    except OnnxpruneError:
        if other == analysed:
            raise
    return run_at(analysed)


def verify(analysis: Analysis, plan: Plan, cut: onnx.ModelProto, *, seed: int = 0,
           rtol: float | None = None, atol: float | None = None) -> Verification:
    """Raise VerificationError unless the cut model is exactly the gated original (to
    :func:`tolerance` of the original's dtype unless ``rtol``/``atol`` are given)."""
    default_rtol, default_atol = tolerance(analysis.model)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    check_model(cut, "the cut model")
    release_memory()   # what building the cut left, before the original runs
    gated = gate_model(analysis, blocks=list(plan.cuts))
    feeds, reference = _reference_run(analysis, gated, plan, seed)
    _check_finite_reference(analysis.model, reference)
    caches = cache_cuts(analysis, plan)
    cut_feeds = {name: caches[name](value) if name in caches else value
                 for name, value in feeds.items()}
    reference = {name: caches[name](value) if name in caches else value
                 for name, value in reference.items()}
    release_memory()   # the original's weights, before the cut's are read
    try:
        got = run(make_session(cut), cut_feeds)
    except Exception as exc:
        raise VerificationError(f"the cut model does not run: {exc}") from exc
    worst_abs, worst_rel = 0.0, 0.0
    for name, ref in reference.items():
        out = got.get(name)
        if out is None or out.shape != ref.shape:
            raise VerificationError(f"output {name!r}: shape {None if out is None else out.shape}"
                                    f" after the cut, expected {ref.shape}")
        if not np.all(np.isfinite(out)):
            raise VerificationError(f"output {name!r} of the cut model has NaN or inf")
        diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        if diff > atol + rtol * scale:
            raise VerificationError(f"output {name!r} differs from the gated original by "
                                    f"{diff:.3g} (allowed {atol + rtol * scale:.3g})")
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale else 0.0)
    batch = next((np.shape(v)[0] for v in feeds.values() if np.ndim(v)), None)
    return Verification(worst_abs, worst_rel, len(reference), batch, rtol, atol,
                        {k: [int(d) for d in np.shape(v)] for k, v in feeds.items()}, seed)


def _check_finite_reference(model: onnx.ModelProto, reference: dict[str, np.ndarray]) -> None:
    """The original itself must compute finite outputs on the verification inputs, or no
    cut can be compared with it: that is the model's fault (bad input, exit 2), not the
    cut's; the error names the weights holding NaN or inf."""
    bad = [name for name, value in reference.items()
           if np.asarray(value).dtype.kind == "f" and not np.all(np.isfinite(value))]
    if not bad:
        return
    weights = [t.name for t in model.graph.initializer if t.data_type in _FLOAT_TYPES
               and t.data_type != onnx.TensorProto.BFLOAT16
               and not np.all(np.isfinite(tensor_array(t)))]
    cause = (f"weight(s) {', '.join(repr(w) for w in weights[:3])} hold NaN or inf" if weights
             else "it overflows on random inputs")
    raise OnnxpruneError(f"the original model's output {bad[0]!r} is NaN or inf on the "
                         f"verification inputs ({cause}): nothing to verify a cut against")


def cache_cuts(analysis: Analysis, plan: Plan) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """For each key/value cache (past input, present output) of a block the plan cuts into:
    the function that deletes the removed heads' (channels') entries from a value of the
    original's shape. The cut model reads the past so cut; the gated original reads the
    full past (the removed heads' entries present), and its present output, so cut, is what
    the cut model must return."""
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for name, cut in plan.cuts.items():
        block = analysis.structure.block(name)
        cache = getattr(block, "cache", None)
        if cut.empty or cut.whole or not cache or block.flow is None:
            continue
        roles = block_roles(block, cut)
        for past, present in cache.items():
            # the present's labels stand for the past's too (same heads and channels; a past
            # of length 0 has no labels to read them from)
            labels = block.flow.labels[present]
            for tensor in (past, present):
                out[tensor] = partial(cut_cache, labels=labels, roles=roles, name=tensor)
    return out
