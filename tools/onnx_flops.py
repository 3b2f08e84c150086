"""FLOPs of an ONNX model at a fixed batch size: MatMul, Gemm and Conv counted as 2·MACs.

    python tools/onnx_flops.py models/patchtst_etth1.onnx [--batch 1]

Every other op (softmax, norms, elementwise) is left out. Shapes come from ONNX shape
inference with the symbolic batch dimension fixed; where inference leaves a shape open,
the model is run once in ONNX Runtime on zeros to read the actual shapes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

COUNTED = ("MatMul", "Gemm", "Conv")


def _fix_batch(model: onnx.ModelProto, batch: int) -> None:
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") or dim.dim_value == 0:
                dim.Clear()
                dim.dim_value = batch


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    for v in values:
        dims = v.type.tensor_type.shape.dim
        static = all(d.HasField("dim_value") for d in dims)
        if v.type.tensor_type.HasField("shape") and static:
            shapes[v.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            if t is not None:
                shapes[node.output[0]] = list(t.dims)
    return shapes


def _runtime_shapes(model: onnx.ModelProto, names: set[str]) -> dict[str, list[int]]:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in probe.graph.value_info}
    for name in sorted(names - known):
        elem = types.get(name) or TensorProto.FLOAT
        probe.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        dtype = np.float32 if "float" in inp.type else np.int64
        feeds[inp.name] = np.zeros(inp.shape, dtype)
    outs = sess.run(None, feeds)
    return {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs, strict=True)}


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    a, b = shapes[node.input[0]], shapes[node.input[1]]
    if node.op_type == "MatMul":
        a2 = [1, *a] if len(a) == 1 else a
        b2 = [*b, 1] if len(b) == 1 else b
        batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
        return int(np.prod(batch, dtype=np.int64)) * a2[-2] * a2[-1] * b2[-1]
    if node.op_type == "Gemm":
        attrs = {x.name: x.i for x in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
        n = b[0] if attrs.get("transB") else b[1]
        return m * k * n
    out = shapes[node.output[0]]  # Conv: each output element costs (Cin/group)·kernel MACs
    return int(np.prod(out, dtype=np.int64)) * b[1] * int(np.prod(b[2:], dtype=np.int64))


def count_flops(path: str | Path, batch: int = 1) -> dict:
    model = onnx.load(str(path))
    _fix_batch(model, batch)
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = _static_shapes(model)
    nodes = [n for n in model.graph.node if n.op_type in COUNTED]
    needed = {t for n in nodes for t in (*n.input[:2], n.output[0])}
    missing = {t for t in needed if t not in shapes}
    if missing:
        shapes.update(_runtime_shapes(model, missing))
    by_op: dict[str, int] = {}
    for node in nodes:
        by_op[node.op_type] = by_op.get(node.op_type, 0) + 2 * _macs(node, shapes)
    params = sum(int(np.prod(i.dims, dtype=np.int64)) for i in model.graph.initializer)
    params += sum(
        numpy_helper.to_array(a.t).size
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    )
    return {
        "file": str(path),
        "batch": batch,
        "flops": sum(by_op.values()),
        "flops_by_op": by_op,
        "stored_values": int(params),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    for path in args.models:
        r = count_flops(path, args.batch)
        print(json.dumps(r) if len(args.models) > 1 else json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
