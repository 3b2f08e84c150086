"""What each model input means, read from the graph, so synthesised (data-free) inputs mean
something: token ids drawn from the embedding table's range rather than all zeros, masks of
ones, positions counting up, token-type ids of zero, floats from a normal distribution.

Token ids are recognised by use, not by name: an integer input that reaches the indices of a
``Gather`` on a constant table (through casts and reshapes) indexes that table's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

_PASS = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
# (domain, op, position of an index input) -> position of the table it indexes (its rows)
_INDEXES = {
    ("", "Gather", 1): 0,
    ("com.microsoft", "EmbedLayerNormalization", 0): 2,   # ORT-optimized BERT embeddings
    ("com.microsoft", "EmbedLayerNormalization", 1): 4,
}


@dataclass(frozen=True)
class InputRole:
    """``kind``: values, token ids, positions, token types or mask; ``rows``: the size of
    the table ids index (ids are drawn below it)."""

    kind: str
    rows: int | None = None

    def describe(self) -> str:
        if self.kind in ("token ids", "positions") and self.rows:
            return f"{self.kind} in [0, {self.rows})"
        return {"mask": "all ones", "token types": "zeros",
                "values": "standard normal"}.get(self.kind, self.kind)


def input_roles(model: onnx.ModelProto) -> dict[str, InputRole]:
    """The role of every graph input (initializers listed as inputs are skipped)."""
    tables = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consts = {o: _constant_shape(n) for n in model.graph.node if n.op_type == "Constant"
              for o in n.output}
    tables.update({k: v for k, v in consts.items() if v is not None})
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    roles = {}
    for vi in model.graph.input:
        if vi.name in tables:
            continue
        elem = vi.type.tensor_type.elem_type
        roles[vi.name] = _role(vi.name, elem, _indexed_rows(vi.name, users, tables))
    return roles


def _role(name: str, elem: int, rows: int | None) -> InputRole:
    lower = name.lower()
    if "mask" in lower or elem == onnx.TensorProto.BOOL:
        return InputRole("mask")
    if elem in _FLOATS:
        return InputRole("values")
    if "position" in lower:
        return InputRole("positions", rows)
    if "token_type" in lower or "segment" in lower:
        return InputRole("token types", rows)
    return InputRole("token ids", rows)


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
           onnx.TensorProto.DOUBLE}


def _indexed_rows(name: str, users: dict[str, list[onnx.NodeProto]],
                  tables: dict[str, tuple[int, ...]]) -> int | None:
    """Rows of the constant table that ``name`` (through casts and reshapes) indexes."""
    stack, seen = [name], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in users.get(tensor, []):
            rows = _table_rows(node, tensor, tables)
            if rows:
                return rows
            if node.op_type in _PASS and node.input[0] == tensor:
                stack.extend(node.output)
    return None


def _table_rows(node: onnx.NodeProto, tensor: str, tables: dict[str, tuple[int, ...]]
                ) -> int | None:
    """Rows of the constant table ``node`` indexes with ``tensor`` (None: it does not)."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    for position, name in enumerate(node.input):
        table = _INDEXES.get((domain, node.op_type, position))
        if name == tensor and table is not None and table < len(node.input):
            shape = tables.get(node.input[table])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if shape:
                return int(shape[axis])
    return None


def _constant_shape(node: onnx.NodeProto) -> tuple[int, ...] | None:
    for attr in node.attribute:
        if attr.name == "value":
            return tuple(numpy_helper.to_array(attr.t).shape)
    return None


def synthesise(role: InputRole, shape: tuple[int, ...], dtype: type,
               rng: np.random.Generator) -> np.ndarray:
    """One input of ``shape`` and ``dtype`` that fits its role."""
    if role.kind == "mask":
        return np.ones(shape, dtype=dtype)
    if role.kind == "values" or np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if role.kind == "token types" or not shape:
        return np.zeros(shape, dtype=dtype)
    if role.kind == "positions":
        count = shape[-1] if not role.rows else min(shape[-1], role.rows)
        steps = np.arange(shape[-1]) % max(count, 1)
        return np.broadcast_to(steps, shape).astype(dtype)
    high = role.rows or 2
    return rng.integers(0, high, size=shape).astype(dtype)
