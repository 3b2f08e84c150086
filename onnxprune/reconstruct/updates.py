"""Weight updates and their proof: the written model is the verified cut with exactly the
named initializers replaced, and nothing else changed."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import OnnxpruneError, VerificationError
from onnxprune.weightstore import is_large, model_store, tensor_array

Updates = Mapping[str, np.ndarray]


def apply_updates(model: onnx.ModelProto, updates: Updates) -> onnx.ModelProto:
    """A copy of ``model`` with the initializers ``updates`` names holding the new values
    (cast to each initializer's own dtype and shape)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    store = model_store(model)
    for name, value in updates.items():
        if name not in inits:
            raise OnnxpruneError(f"reconstruction updates unknown initializer {name!r}")
        new = _tensor(inits[name], value)
        if store is not None and is_large(new):
            store.put(new)   # a large model's new weights join its store (as a stub)
        inits[name].CopyFrom(new)
    return out


def _tensor(old: onnx.TensorProto, value: np.ndarray) -> onnx.TensorProto:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
    return numpy_helper.from_array(np.asarray(value, dtype).reshape(tuple(old.dims)), old.name)


def check_updates(verified: onnx.ModelProto, written: onnx.ModelProto, updates: Updates
                  ) -> None:
    """Prove ``written`` equals ``verified`` with exactly ``updates`` applied: every node,
    input, output and attribute identical; every initializer byte-identical except the
    updated ones, which hold the update (in their original dtype and shape). Raises
    VerificationError naming the first difference."""
    if _without_initializers(verified) != _without_initializers(written):
        raise VerificationError("reconstruction changed the graph itself, not only weights; "
                                "nothing written")
    before = {t.name: t for t in verified.graph.initializer}
    after = {t.name: t for t in written.graph.initializer}
    if list(before) != list(after):
        raise VerificationError("reconstruction added, removed or reordered initializers; "
                                "nothing written")
    unknown = sorted(set(updates) - set(before))
    if unknown:
        raise VerificationError(f"reconstruction names unknown initializer {unknown[0]!r}")
    for name, tensor in after.items():
        want = _tensor(before[name], updates[name]) if name in updates else before[name]
        if not _same(tensor, want):
            what = "does not hold its update" if name in updates else "changed without being named"
            raise VerificationError(f"initializer {name!r} {what}; nothing written")


def _without_initializers(model: onnx.ModelProto) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.initializer[:]
    return copy.SerializeToString(deterministic=True)


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
        return True
    x, y = tensor_array(a), tensor_array(b)
    return x.tobytes() == y.tobytes()
