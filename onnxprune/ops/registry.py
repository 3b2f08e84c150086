"""Op rules and attention forms, keyed by (ONNX domain, op type, opset range).

An op rule says how labels flow through an op (``propagate``), how the cut fixes the op's
shape-carrying inputs and attributes (``fix``) and what the op costs (``flops``). An
attention form says how to find an attention block's Q·Kᵀ and A·V contractions from its
anchor op. Rules and forms receive the label engine and the cut's surgeon as duck-typed
objects (the Protocols below), so rule files never import ``axes.py`` or ``cut.py``.

Add a rule::

    @register
    class MyOp(OpRule):
        ops = frozenset({"MyOp"})
        domain = "com.example"
        since, until = 1, None

        def propagate(self, engine, node, flow): ...
        def fix(self, surgeon, node): ...

Add an attention form (a new file in this package is imported automatically)::

    @register_form
    class MyAttention(AttentionForm):
        ops = frozenset({"MultiHeadAttention"})
        domain = "com.microsoft"

        def anchors(self, view, node):
            return AttentionAnchors(qk=node, av=node, q=node.inputs[0], ...)

plus an ``OpRule`` for the same op, as the fused op is also on the label path. Entries
registered later win over earlier ones for the same key, so a user can override a built-in
rule by registering a new one (``unregister`` removes it again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol, TypeVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.structure.graph import GraphView, canonical_domain, node_domain

if TYPE_CHECKING:
    from onnxprune.structure.blocks import Block
    from onnxprune.structure.labels import Flow

OpsetLookup = Mapping[str, int] | Callable[[str], "int | None"]


class LabelEngine(Protocol):
    """What a rule may use of the label engine (``structure.axes.LabelPropagator``)."""

    view: GraphView
    trace: dict[str, np.ndarray]

    def shape(self, name: str) -> tuple[int, ...]:
        """The traced shape of tensor ``name``."""

    def value(self, tensor: gs.Tensor) -> np.ndarray:
        """The constant or traced value of ``tensor``."""

    def new_token(self) -> int:
        """A fresh head token (the label of one head's attention weights)."""


class CutRoles(Protocol):
    removed_heads: set[int]

    def keep(self, labels: np.ndarray) -> np.ndarray:
        """True where a label survives the cut."""


class Surgeon(Protocol):
    """What a rule may use of the cut (``cut.BlockSurgeon``): shapes of every labelled
    tensor before (``old``) and after (``new``) the cut, and helpers to rewrite inputs."""

    graph: gs.Graph
    view: GraphView
    trace: dict[str, np.ndarray]
    block: Block
    flow: Flow
    roles: CutRoles
    old: dict[str, tuple[int, ...]]
    new: dict[str, tuple[int, ...]]

    def const(self, name: str, value: np.ndarray) -> gs.Constant:
        """A new constant under a fresh name based on ``name``."""

    def retarget(self, node: gs.Node, index: int, out: str) -> None:
        """Make shape input ``index`` of ``node`` produce the cut shape of ``out``."""

    def kept_positions(self, tensor: str, axis: int) -> np.ndarray:
        """Per position along ``axis`` of ``tensor``: whether anything there is kept."""

    def traced(self, tensor: gs.Tensor) -> np.ndarray:
        """The constant or traced value of ``tensor`` as a flat int64 array (a copy)."""


class _Keyed:
    """Matching on (domain, op type, opset range); ``until`` is inclusive, None = open."""

    ops: ClassVar[frozenset[str]] = frozenset()
    domain: ClassVar[str] = ""
    since: ClassVar[int] = 1
    until: ClassVar[int | None] = None

    def covers(self, opset: int | None) -> bool:
        # a domain the model does not import has no version to check against
        return opset is None or (self.since <= opset
                                 and (self.until is None or opset <= self.until))


class OpRule(_Keyed):
    """How one family of ops takes part in label propagation, the cut and cost counting."""

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        """Write the labels of ``node``'s outputs into ``flow.labels`` (at least one input is
        labelled) and record sinks, contractions and operands; raise ``NotPrunableError``
        when the op's effect on the labels cannot be proven. By default: refused."""
        raise NotPrunableError(f"{qualified_op(node)} node {node.name} on a prunable path "
                               "is not supported")

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Rewrite ``node`` (in the graph being cut) so it works on the cut shapes
        ``surgeon.new``; an op whose inputs and attributes name no sizes does nothing, but
        says so by overriding this. By default: refused."""
        raise NotPrunableError(f"{qualified_op(node)} node {node.name}: its op rule cannot "
                               "fix it for the cut")

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        """FLOPs of ``node`` at the traced shapes (its first output is traced)."""
        return 0

    def caches(self, node: gs.Node) -> dict[int, int]:
        """A fused attention op that keeps a key/value cache: output index of each present
        cache -> input index of its past (empty for every other op)."""
        return {}


class AttentionAnchors(NamedTuple):
    """Where an attention block's contractions are (the same node for a fused op)."""

    qk: gs.Node
    av: gs.Node
    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor


class AttentionForm(_Keyed):
    """One way attention appears in a graph, found from its anchor op (``ops``). The label
    engine does the rest: the form only says where Q·Kᵀ, A·V and q/k/v are."""

    def anchors(self, view: GraphView, node: gs.Node) -> AttentionAnchors | None:
        """The contractions and q/k/v inputs of the attention at ``node``, or None when
        ``node`` is not one (a softmax elsewhere, say)."""
        raise NotImplementedError

    def channel_limit(self, view: GraphView, node: gs.Node) -> str | None:
        """Why the QK/VO channels of the attention at ``node`` cannot be cut whatever the
        graph around it (a fused op with one head size for all three, say); None: they can."""
        return None


_RULES: dict[tuple[str, str], list[OpRule]] = {}
_FORMS: dict[tuple[str, str], list[AttentionForm]] = {}
R = TypeVar("R", bound=type[OpRule])
F = TypeVar("F", bound=type[AttentionForm])


def _add(table: dict, entry: _Keyed) -> None:
    if not entry.ops:
        raise ValueError(f"{type(entry).__name__} names no op types")
    for op in entry.ops:
        table.setdefault((canonical_domain(entry.domain), op), []).insert(0, entry)


def _remove(table: dict, cls: type) -> None:
    for key, entries in table.items():
        table[key] = [e for e in entries if type(e) is not cls]


def register(cls: R) -> R:
    """Class decorator: register an instance of an ``OpRule`` subclass."""
    _add(_RULES, cls())
    return cls


def register_form(cls: F) -> F:
    """Class decorator: register an instance of an ``AttentionForm`` subclass."""
    _add(_FORMS, cls())
    return cls


def unregister(cls: type) -> None:
    """Remove the rules or forms of class ``cls`` (registered by ``register``)."""
    _remove(_RULES if issubclass(cls, OpRule) else _FORMS, cls)


def _lookup(table: dict, node: gs.Node, opset_of_domain: OpsetLookup):
    domain = node_domain(node)
    opset = opset_of_domain(domain) if callable(opset_of_domain) \
        else opset_of_domain.get(domain)
    return next((e for e in table.get((domain, node.op), ()) if e.covers(opset)), None)


def rule_for(node: gs.Node, opset_of_domain: OpsetLookup) -> OpRule | None:
    """The rule for ``node`` at the model's opset of its domain (a mapping domain -> version
    or a function of the domain, e.g. ``GraphView.opset``), or None."""
    return _lookup(_RULES, node, opset_of_domain)


def form_for(node: gs.Node, opset_of_domain: OpsetLookup) -> AttentionForm | None:
    """The attention form anchored at ``node``'s op, or None."""
    return _lookup(_FORMS, node, opset_of_domain)


def qualified_op(node: gs.Node) -> str:
    """``Op`` for the default ONNX domain, ``domain.Op`` for any other."""
    domain = node_domain(node)
    return f"{domain}.{node.op}" if domain else node.op


def require_rule(node: gs.Node, opset_of_domain: OpsetLookup) -> OpRule:
    """The rule for ``node``; a node on a prunable path without one is refused by name."""
    rule = rule_for(node, opset_of_domain)
    if rule is None:
        raise NotPrunableError(f"{qualified_op(node)} node {node.name} on a prunable path "
                               "has no rule")
    return rule
