"""The discover stage: a model in, its prunable structure out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import OnnxpruneError
from onnxprune.input_roles import input_roles
from onnxprune.runtime import input_specs, synthetic_feeds
from onnxprune.structure.blocks import Structure, find_blocks
from onnxprune.structure.cost import model_flops, model_params
from onnxprune.structure.graph import GraphView, unique_node_names
from onnxprune.tracing import trace


@dataclass
class Analysis:
    """Everything the later stages need about one model: the (renamed) model, its graph
    view, one traced run and the structure found in it."""

    model: onnx.ModelProto
    view: GraphView
    trace: dict[str, np.ndarray]
    structure: Structure
    dynamic_defaults: list[str]


def analyse(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None
            ) -> Analysis:
    """Trace the model at concrete input shapes and find its attention and FFN blocks.

    Dynamic dims not given in ``shapes`` are taken as 1 (listed in ``dynamic_defaults``).
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    unique_node_names(work)
    drop_io_value_info(work)
    specs = input_specs(work)
    unknown = set(shapes or {}) - {s.name for s in specs}
    if unknown:
        raise OnnxpruneError(f"--shape names unknown input {sorted(unknown)[0]!r}; inputs are "
                             f"{[s.name for s in specs]}")
    feeds = synthetic_feeds(specs, shapes, seed=0, dynamic=1, roles=input_roles(work))
    values = trace(work, feeds)
    view = GraphView(gs.import_onnx(work))
    blocks = find_blocks(view, values)
    structure = Structure(blocks, model_params(view), model_flops(view, values),
                          {k: tuple(np.shape(v)) for k, v in feeds.items()})
    defaults = [s.name for s in specs if s.is_dynamic and s.name not in (shapes or {})]
    return Analysis(work, view, values, structure, defaults)


def drop_io_value_info(model: onnx.ModelProto) -> None:
    """Remove value_info entries of graph inputs and outputs: they repeat the declaration,
    and where one has less (ONNX Runtime's float16 converter leaves a shapeless one for the
    output) graphsurgeon would take it over the graph's own declared shape."""
    io = {v.name for v in (*model.graph.input, *model.graph.output)}
    kept = [v for v in model.graph.value_info if v.name not in io]
    if len(kept) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
