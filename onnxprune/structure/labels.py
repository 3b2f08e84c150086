"""The label data the coupled-axis engine produces and the op rules read and write.

A label is an integer id for one column of a projection weight (or a head token); -1 marks
an element no tracked column reaches. Pure data: no imports of the engine or the rules, so
that both can import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOKEN_BASE = 1 << 40  # head tokens (attention-weight labels) count up from here


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while a != root:
            self.parent[a], a = root, self.parent.get(a, a)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Sink:
    """A matmul with a constant weight that contracts a labelled axis: ``rows[r]`` is the
    label of weight row r (of the effective [K, N] matrix)."""

    node: str
    input: str
    rows: np.ndarray


@dataclass
class Contraction:
    """A matmul of two labelled tensors, flattened over its batch positions.

    kind "channel": Q·Kᵀ, ``left[p]`` and ``right[p]`` are the contracted labels at batch
    position p, paired index by index. kind "mix": A·V, ``left[p]`` is the head token of the
    attention weights at p and ``right[p]`` the labels of V's last axis.
    """

    node: str
    kind: str
    left: np.ndarray
    right: np.ndarray
    token_of: dict[tuple[int, ...], int] = field(default_factory=dict)


@dataclass
class Operand:
    """A non-labelled input that broadcasts along a labelled axis; a cut must slice it."""

    node: str
    index: int


@dataclass
class Flow:
    labels: dict[str, np.ndarray]
    sinks: list[Sink]
    contractions: list[Contraction]
    operands: list[Operand]
    shape_reads: list[str]
    nodes: list[str]
    uf: UnionFind


def column_labels(shape: tuple[int, ...], base: int) -> np.ndarray:
    """Labels of a projection output: column c of the weight gets id base + c."""
    cols = np.arange(base, base + shape[-1], dtype=np.int64)
    return np.broadcast_to(cols, shape)


def compact(labels: np.ndarray) -> np.ndarray:
    """The same labels, held as a read-only broadcast of their distinct part: along an axis
    where every slice is the same (a token or batch axis), one slice is kept. A large
    model's label arrays would otherwise take as much memory as its activations."""
    reduced = labels
    for axis in range(labels.ndim):
        if reduced.shape[axis] > 1 and not varies_along(reduced, axis):
            reduced = reduced.take([0], axis=axis)
    if reduced.size == labels.size:
        return labels
    return np.broadcast_to(np.ascontiguousarray(reduced), labels.shape)


def varies_along(labels: np.ndarray, axis: int) -> bool:
    if labels.shape[axis] < 2:
        return False
    return bool(np.any(np.diff(labels, axis=axis) != 0))
