"""ONNX Runtime sessions: providers, synthetic feeds, runs (probes of intermediate tensors
included)."""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxprune.errors import OnnxpruneError
from onnxprune.input_roles import InputRole, synthesise
from onnxprune.late_reads import read_late
from onnxprune.shapes import InputSpec, check_fits, input_specs
from onnxprune.weightstore import session_weights

# the signature lives in onnxprune.shapes; these names stay importable from here
__all__ = ["InputSpec", "available_providers", "input_specs", "make_session", "ort_message",
           "probe_model", "run", "synthetic_feeds"]


def synthetic_feeds(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None,
                    *, seed: int = 0, dynamic: int = 1,
                    roles: Mapping[str, InputRole] | None = None) -> dict[str, np.ndarray]:
    """Random inputs matching the signature. With ``roles`` (``input_roles(model)``) each
    input fits what it means (token ids within their table, positions, masks of ones);
    without, normal floats, zeros for ids and ones for masks."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.concrete(shapes, dynamic)
        dtype = np.dtype(spec.dtype)
        # floats are drawn in float64, then cast; the model's activations at this size take
        # a multiple of it: at most a quarter of the memory
        peak = math.prod(shape) * (dtype.itemsize + (8 if dtype.kind == "f" else 0))
        check_fits(f"synthetic input {spec.name} {list(shape)} {dtype.name}", peak, 0.25)
        role = (roles or {}).get(spec.name)
        if role is not None:
            feeds[spec.name] = synthesise(role, shape, spec.dtype, rng)
        elif np.issubdtype(spec.dtype, np.floating):
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
    ``arena=False`` allocates each buffer on its own and frees it back to the system after
    each run (lower peak memory for the large gradient graphs, a little slower)."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = arena   # a pattern is one block for all of a run's buffers
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 4   # failures become one-line errors (run): no C++ log too
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = providers or ["CPUExecutionProvider"]
    model, shared, fed = _share_weights(model, opts)
    try:
        if model.ByteSize() < 1_800_000_000:
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
            session.shared_weights = shared   # the views must outlive the session
            session.fed_weights = fed
            return session
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, opts, providers=providers)
    except Exception as exc:  # onnxruntime raises several exception types
        raise OnnxpruneError(_half_kernel_gap(model, exc)
                             or f"ONNX Runtime cannot load the model: {_first_line(exc)}"
                             ) from exc


_HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _share_weights(model: onnx.ModelProto, opts: ort.SessionOptions
                   ) -> tuple[onnx.ModelProto, list[ort.OrtValue], dict[str, ort.OrtValue]]:
    """Hand the session the stubs' weights (``weightstore``): views of one memory map, so
    that every session of a run reads the same pages. Prepacking is off, since it would
    make each session its own packed copy.

    Float weights are shared initializers. Half-precision ones become graph inputs fed at
    every run (``run``): on the CPU, ONNX Runtime computes half-precision matmuls in float32
    and would keep a float32 copy of every constant half weight, twice the model, in each
    session; fed, each is widened only while its node runs (``late_reads``: not all at
    the start). Returns the model (a copy when weights became inputs), the shared values
    and the fed ones."""
    folder, views = session_weights(model)
    if not views:
        return model, [], {}
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(folder))
    opts.enable_cpu_mem_arena = False   # an arena keeps every widened weight it ever held
    half = {t.name for t in model.graph.initializer
            if t.name in views and t.data_type in _HALF}
    shared, fed = [], {}
    for name, view in views.items():
        value = ort.OrtValue.ortvalue_from_numpy(view)
        if name in half:
            fed[name] = value
        else:
            shared.append(value)
            opts.add_initializer(name, value)
    if half:
        model = _copy(model)
        read_late(model, initializers_to_inputs(model, half))
    return model, shared, fed


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def initializers_to_inputs(model: onnx.ModelProto, names: set[str]
                           ) -> dict[str, onnx.TensorProto]:
    """The initializers ``names`` become graph inputs of their type and dims (in place);
    the initializers taken out, by name."""
    taken = {t.name: t for t in model.graph.initializer if t.name in names}
    kept = [t for t in model.graph.initializer if t.name not in names]
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in taken.values())
    taken = {name: _tensor_copy(t) for name, t in taken.items()}
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return taken


def _tensor_copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    return out


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in session.get_outputs()]
    fed = getattr(session, "fed_weights", None)
    try:
        if fed:
            given = {k: ort.OrtValue.ortvalue_from_numpy(np.asarray(v, order="C"))
                     for k, v in feeds.items()}
            values = [v.numpy() for v in session.run_with_ort_values(names,
                                                                     {**given, **fed})]
        else:
            values = session.run(names, dict(feeds))
    except Exception as exc:
        raise OnnxpruneError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from exc
    return dict(zip(names, values))


def run_in_parts(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
                 part: int | None, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """``run`` over ``part`` samples at a time, outputs joined along the batch axis (a
    large model's activations on a whole calibration batch would pass its weights); one
    run when ``part`` is None, the batch fits, or an input does not lead with the batch."""
    sizes = {len(v) if np.ndim(v) else -1 for v in feeds.values()}
    if not part or len(sizes) != 1 or max(sizes) <= part:
        return run(session, feeds, outputs)
    batch = sizes.pop()
    pieces = [run(session, {k: v[i:i + part] for k, v in feeds.items()}, outputs)
              for i in range(0, batch, part)]
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def with_outputs(model: onnx.ModelProto, outputs: Mapping[str, int]) -> onnx.ModelProto:
    """A copy that also returns the tensors ``outputs`` (name -> element type)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, t, None)
                            for n, t in outputs.items() if n not in have)
    return out


def probe_model(model: onnx.ModelProto, names: list[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names`` (all of them
    when None)."""
    elem_types = element_types(model)
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


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of each tensor that shape inference (with the contrib ops' own
    inference where ONNX's has none) types, by name."""
    typed = onnx.shape_inference.infer_shapes(model, data_prop=True)
    elem_types = {vi.name: vi.type.tensor_type.elem_type
                  for vi in [*typed.graph.value_info, *typed.graph.output, *typed.graph.input]}
    del typed
    if any(node.domain not in ("", "ai.onnx") for node in model.graph.node):
        _contrib_types(model, elem_types)
    return elem_types


def _contrib_types(model: onnx.ModelProto, elem_types: dict[str, int]) -> None:
    """Element types of the tensors ONNX's own inference leaves untyped because a contrib op
    (com.microsoft Attention, SkipLayerNormalization, ...) produces them or feeds them: ONNX
    Runtime's symbolic shape inference knows those ops; where it fails, output 0 of a contrib
    op gets the type of its first typed input, and standard ops are inferred again."""
    def untyped(name: str) -> bool:
        return bool(name) and not elem_types.get(name)

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True,
                                                       guess_output_rank=True)
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            if untyped(vi.name) and vi.type.tensor_type.elem_type:
                elem_types[vi.name] = vi.type.tensor_type.elem_type
    except Exception:
        pass
    if not any(untyped(o) for node in model.graph.node for o in node.output):
        return
    inits = {i.name: i.data_type for i in model.graph.initializer}
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    for _ in range(len(model.graph.node)):
        added = False
        for node in typed.graph.node:
            if node.domain in ("", "ai.onnx") or not node.output or not untyped(node.output[0]):
                continue
            first = next((elem_types.get(i) or inits[i] for i in node.input
                          if elem_types.get(i) or inits.get(i)), None)
            if first is not None:
                elem_types[node.output[0]] = first
                added = True
        if not added:
            return
        del typed.graph.value_info[:]
        typed.graph.value_info.extend(helper.make_tensor_value_info(name, t, None)
                                      for name, t in elem_types.items() if t)
        try:
            again = onnx.shape_inference.infer_shapes(typed)
        except Exception:
            return
        for vi in again.graph.value_info:
            if untyped(vi.name) and vi.type.tensor_type.elem_type:
                elem_types[vi.name] = vi.type.tensor_type.elem_type


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return ort_message(text[0]) if text else type(exc).__name__


_ORT_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_CPP_PLACE = re.compile(r"\S+\.(?:cc|cpp|cxx|h|hpp):\d+ "
                        r"(?:[\w:<>,&*~ ]*::[\w:<>,&*~ ]*\([^()]*\)(?: const)? )?")


def ort_message(line: str) -> str:
    """One line of an ONNX Runtime error without its status prefix, C++ source locations and
    function signatures ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/...h:46 void
    onnxruntime::f(...) Opset 99 is ..." -> "Opset 99 is ...")."""
    rest = _CPP_PLACE.sub("", _ORT_STATUS.sub("", line))
    return rest.strip() or line


_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name "
                        r"'([^']*)'")
_HALF_NAMES = {onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.FLOAT16: "float16"}


def _half_kernel_gap(model: onnx.ModelProto, exc: BaseException) -> str | None:
    """The one-line error for a model ONNX Runtime lacks a half-precision kernel for (its
    CPU provider runs no bfloat16 MatMul, Add, ...): names the op and the dtype."""
    found = _NO_KERNEL.search(str(exc))
    if not found:
        return None
    types = {t.data_type for t in model.graph.initializer}
    types |= {vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output,
                                                        *model.graph.value_info]}
    half = next((name for t, name in _HALF_NAMES.items() if t in types), None)
    if half is None:
        return None
    op, node = found.group(1), found.group(3)
    known = {t.name: t.data_type for t in model.graph.initializer}
    known.update({vi.name: vi.type.tensor_type.elem_type for vi in
                  [*model.graph.input, *model.graph.output, *model.graph.value_info]})
    reads = [known[i] for n in model.graph.node if node and n.name == node
             for i in n.input if known.get(i)]
    if reads and not any(t in _HALF_NAMES for t in reads):
        return None
    where = f" (node {node!r})" if node else ""
    return (f"ONNX Runtime has no {half} kernel for {op}{where} on this provider: onnxprune "
            f"cannot run this {half} model; convert it to float16 or float32"
            if half == "bfloat16" else
            f"ONNX Runtime has no {half} kernel for {op}{where} on this provider")
