"""ONNX Runtime sessions: providers, synthetic feeds, full traces."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxprune.errors import OnnxpruneError
from onnxprune.shapes import InputSpec, input_specs

# the signature lives in onnxprune.shapes; these names stay importable from here
__all__ = ["InputSpec", "available_providers", "input_specs", "make_session", "probe_model",
           "run", "synthetic_feeds", "trace"]


def synthetic_feeds(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None,
                    *, seed: int = 0, dynamic: int = 1) -> dict[str, np.ndarray]:
    """Random inputs matching the signature: normal floats; zeros for ids, ones for masks."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.concrete(shapes, dynamic)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
        else:
            fill = 1 if "mask" in spec.name.lower() else 0
            feeds[spec.name] = np.full(shape, fill, dtype=spec.dtype)
    return feeds


def available_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, CPU always."""
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def make_session(model: onnx.ModelProto, *, optimize: bool = True, threads: int = 0,
                 providers: list[str] | None = None, arena: bool = True
                 ) -> ort.InferenceSession:
    """An inference session over an in-memory model (via a temp file when over 2 GiB).
    ``arena=False`` frees buffers back to the system after each run (lower peak memory for
    the large gradient graphs, a little slower)."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = providers or ["CPUExecutionProvider"]
    try:
        if model.ByteSize() < 1_800_000_000:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, opts, providers=providers)
    except Exception as exc:  # onnxruntime raises several exception types
        raise OnnxpruneError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from exc


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feeds))
    except Exception as exc:
        raise OnnxpruneError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from exc
    return dict(zip(names, values))


def probe_model(model: onnx.ModelProto, names: list[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names`` (all of them
    when None)."""
    typed = onnx.shape_inference.infer_shapes(model, data_prop=True)
    elem_types = {vi.name: vi.type.tensor_type.elem_type
                  for vi in [*typed.graph.value_info, *typed.graph.output, *typed.graph.input]}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    wanted = None if names is None else set(names)
    for node in probe.graph.node:
        for name in node.output:
            if (name and name not in existing and elem_types.get(name)
                    and (wanted is None or name in wanted)):
                probe.graph.output.append(
                    helper.make_tensor_value_info(name, elem_types[name], None))
                existing.add(name)
    return probe


def trace(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every intermediate tensor of one run, keyed by name (no graph optimisation).

    The structure analysis reads concrete shapes and the values of shape tensors from it.
    """
    session = make_session(probe_model(model), optimize=False)
    values = run(session, feeds)
    values.update(feeds)
    for init in model.graph.initializer:
        values.setdefault(init.name, onnx.numpy_helper.to_array(init))
    return values


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
