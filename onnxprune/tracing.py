"""The traced run the structure analysis reads: every intermediate tensor of one run at
concrete input shapes, by name.

Discovery needs the shapes of all tensors and the values of shape tensors only, so a float
tensor of ``SHAPE_ONLY_BYTES`` or more is held as zeros of its shape and dtype that take no
memory (a broadcast scalar); :func:`values_of` gives the real values of chosen tensors.

A large model (one in a weight store) is traced segment by segment: its nodes, in order,
are cut into runs whose outputs take about ``TRACE_PART_BYTES``; each segment is its own
model, fed the values earlier segments computed (for an encoder, little more than the
residual stream). Neither the whole trace nor the whole set of weights is then resident at
once.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from onnxprune.runtime import element_types, make_session, probe_model, run
from onnxprune.weightstore import model_store, release_pages, tensor_array

SHAPE_ONLY_BYTES = 1 << 16
TRACE_PART_BYTES = 64 << 20


def trace(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
          part_bytes: int | None = None, keep: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Every intermediate tensor of one run (no graph optimisation), with the feeds and the
    initializers, keyed by name; large float tensors as shapes (see the module doc) unless
    named in ``keep``. With ``part_bytes`` (default: ``TRACE_PART_BYTES`` for a model in a
    weight store, else one run) the graph runs in segments that each return about that many
    bytes."""
    if part_bytes is None and model_store(model) is not None:
        part_bytes = TRACE_PART_BYTES
    keep = set(keep)
    segments = None if part_bytes is None else _segments(model, feeds, part_bytes)
    if segments is None:
        session = make_session(probe_model(model), optimize=False, arena=False)
        values = shapes_only(run(session, feeds), keep)
    else:
        values = _run_segments(model, feeds, *segments, keep)
    values.update(feeds)
    for init in model.graph.initializer:
        values.setdefault(init.name, tensor_array(init))
    return values


def values_of(model: onnx.ModelProto, names: Iterable[str], feeds: Mapping[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
    """The values of the tensors ``names`` (intermediate ones or inputs) in one run (no
    graph optimisation; in segments as :func:`trace`)."""
    names = list(names)
    if model_store(model) is None:
        session = make_session(probe_model(model, names), optimize=False, arena=False)
        out = {**run(session, feeds), **feeds}
    else:
        out = trace(model, feeds, keep=names)
    return {name: np.asarray(out[name]) for name in names if name in out}


def shapes_only(values: Mapping[str, np.ndarray], keep: Container[str] = ()
                ) -> dict[str, np.ndarray]:
    """``values`` with each float array of ``SHAPE_ONLY_BYTES`` or more (not named in
    ``keep``) replaced by zeros of its shape and dtype that take no memory (a broadcast
    scalar)."""
    return {name: np.broadcast_to(np.zeros((), value.dtype), value.shape)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f"
            and value.nbytes >= SHAPE_ONLY_BYTES and name not in keep else value
            for name, value in values.items()}


# -- segments ------------------------------------------------------------------------------

def _segments(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], part_bytes: int
              ) -> tuple[list[list[onnx.NodeProto]], dict[str, int]] | None:
    """The nodes cut into segments of about ``part_bytes`` of outputs, and every tensor's
    element type; None where the graph cannot be cut (a node holds a subgraph, which may
    read any outer name) or a tensor crossing a cut has no known type."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in model.graph.node for a in node.attribute):
        return None
    sizes = _planned_bytes(model, feeds)
    unknown = max(sizes.values(), default=part_bytes)
    segments: list[list[onnx.NodeProto]] = [[]]
    held = 0
    for node in model.graph.node:
        size = sum(sizes.get(o, unknown) for o in node.output if o)
        if segments[-1] and held + size > part_bytes:
            segments.append([])
            held = 0
        segments[-1].append(node)
        held += size
    types = element_types(model)
    if any(not types.get(name) for name in _crossing(segments)):
        return None
    return segments, types


def _crossing(segments: list[list[onnx.NodeProto]]) -> set[str]:
    """Tensors made in one segment and read in a later one."""
    made: dict[str, int] = {}
    crossing = set()
    for index, nodes in enumerate(segments):
        for node in nodes:
            crossing.update(i for i in node.input if made.get(i, index) < index)
            made.update((o, index) for o in node.output if o)
    return crossing


def _run_segments(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                  segments: list[list[onnx.NodeProto]], types: Mapping[str, int],
                  keep: Container[str]) -> dict[str, np.ndarray]:
    last_read = {name: index for index, nodes in enumerate(segments)
                 for node in nodes for name in node.input}
    carried: dict[str, np.ndarray] = dict(feeds)
    values: dict[str, np.ndarray] = {}
    for index, nodes in enumerate(segments):
        segment = _segment_model(model, nodes, types)
        session = make_session(segment, optimize=False, arena=False)
        out = run(session, {i.name: carried[i.name] for i in segment.graph.input})
        del session, segment
        carried.update((k, v) for k, v in out.items() if last_read.get(k, -1) > index)
        for name in [k for k in carried if last_read.get(k, -1) <= index and k not in feeds]:
            del carried[name]
        values.update(shapes_only(out, keep))
        release_pages()   # the next segment reads other weights
    return values


def _segment_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                   types: Mapping[str, int]) -> onnx.ModelProto:
    """``nodes`` as a model: its inputs are the tensors they read that they do not make
    (graph inputs, or values of earlier segments), its outputs all they make."""
    made = {o for node in nodes for o in node.output if o}
    read = list(dict.fromkeys(i for node in nodes for i in node.input if i and i not in made))
    inits = {t.name for t in model.graph.initializer}
    declared = {i.name: i for i in model.graph.input}
    out = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain",
                  "model_version"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = model.graph.name
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name in set(read))
    out.graph.input.extend(declared[n] if n in declared else
                           helper.make_tensor_value_info(n, types[n], None)
                           for n in read if n not in inits)
    out.graph.output.extend(helper.make_tensor_value_info(n, types[n], None)
                            for node in nodes for n in node.output if n and types.get(n))
    return out


def _planned_bytes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Bytes of each intermediate tensor whose shape ONNX shape inference finds with the
    inputs fixed at the feeds' shapes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for vi in fixed.graph.input:
        if vi.name in feeds:
            vi.type.tensor_type.shape.Clear()
            for size in np.shape(feeds[vi.name]):
                vi.type.tensor_type.shape.dim.add().dim_value = int(size)
    try:
        typed = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:
        return {}
    sizes = {}
    for vi in typed.graph.value_info:
        tensor = vi.type.tensor_type
        dims = tensor.shape.dim
        if tensor.elem_type and tensor.HasField("shape") and \
                all(d.HasField("dim_value") for d in dims):
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
            sizes[vi.name] = math.prod(d.dim_value for d in dims) * itemsize
    return sizes
