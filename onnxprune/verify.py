"""The exactness contract: cut(model)(x) == gated(model)(x, removed gates = 0), on random
inputs, for every output; plus onnx.checker (full) and an ONNX Runtime load."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.errors import VerificationError
from onnxprune.gates import gate_model
from onnxprune.runtime import make_session, run, synthetic_feeds
from onnxprune.shapes import input_specs, verification_shapes
from onnxprune.structure.discover import Analysis
from onnxprune.units import Plan


@dataclass
class Verification:
    max_abs_diff: float
    max_rel_diff: float
    outputs: int
    batch: int | None

    def __str__(self) -> str:
        return (f"exact: {self.outputs} output(s), max |diff| {self.max_abs_diff:.2e} "
                f"(relative {self.max_rel_diff:.2e})")


def check_model(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # checker raises several types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"{what} fails onnx.checker: {message}") from exc


def verify(analysis: Analysis, plan: Plan, cut: onnx.ModelProto, *, seed: int = 0,
           rtol: float = 1e-4, atol: float = 1e-5) -> Verification:
    """Raise VerificationError unless the cut model is exactly the gated original."""
    check_model(cut, "the cut model")
    gated = gate_model(analysis, blocks=list(plan.cuts))
    shapes = verification_shapes(input_specs(analysis.model), analysis.structure.input_shapes)
    feeds = synthetic_feeds(input_specs(analysis.model), shapes, seed=seed)
    reference = run(make_session(gated.model), {**feeds, **gated.feeds(plan)})
    try:
        got = run(make_session(cut), feeds)
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
    batch = next(iter(shapes.values()))[0] if shapes else None
    return Verification(worst_abs, worst_rel, len(reference), batch)
