"""The public Python API; the CLI is a thin layer over it.

    import onnxprune
    structure = onnxprune.inspect("model.onnx")
    pruned, check = onnxprune.cut("model.onnx", ["attn0.head1", "ffn1.ch7"])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxprune.cut import apply_plan
from onnxprune.errors import OnnxpruneError
from onnxprune.gates import KINDS, GatedModel, gate_model
from onnxprune.modelio import load_model
from onnxprune.runtime import input_specs, synthetic_feeds, trace
from onnxprune.structure.cost import model_flops, model_params
from onnxprune.structure.discover import Analysis, analyse
from onnxprune.structure.graph import GraphView
from onnxprune.units import Plan, parse_units
from onnxprune.verify import Verification, verify

ModelLike = onnx.ModelProto | str | os.PathLike
Shapes = Mapping[str, tuple[int, ...]] | None


@dataclass
class CutResult:
    model: onnx.ModelProto
    plan: Plan
    verification: Verification
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


def _as_model(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def inspect(model: ModelLike, shapes: Shapes = None) -> Analysis:
    """Find the attention and feed-forward blocks; raise if the model has no attention."""
    analysis = analyse(_as_model(model), shapes)
    if not analysis.structure.attention:
        raise OnnxpruneError("no attention blocks found: onnxprune prunes transformer "
                             "attention and feed-forward blocks")
    return analysis


def measure(model: onnx.ModelProto, shapes: Shapes = None) -> tuple[int, int]:
    """(parameters, FLOPs) of a model at the given input shapes."""
    feeds = synthetic_feeds(input_specs(model), shapes)
    values = trace(model, feeds)
    view = GraphView(gs.import_onnx(model))
    return model_params(view), model_flops(view, values)


def cut(model: ModelLike, units: Iterable[str], shapes: Shapes = None,
        analysis: Analysis | None = None) -> CutResult:
    """Remove the named units; the result is verified exact against the gated original."""
    analysis = analysis or inspect(model, shapes)
    plan = parse_units(units, analysis.structure)
    if not plan.units:
        raise OnnxpruneError("no units to remove")
    pruned = apply_plan(analysis, plan)
    check = verify(analysis, plan, pruned)
    params, flops = measure(pruned, analysis.structure.input_shapes)
    s = analysis.structure
    return CutResult(pruned, plan, check, s.params, params, s.flops, flops)


def gate(model: ModelLike, kinds: Iterable[str] = KINDS, shapes: Shapes = None) -> GatedModel:
    """The model with ablation gate inputs (all 1 reproduces the original outputs)."""
    return gate_model(inspect(model, shapes), kinds)
