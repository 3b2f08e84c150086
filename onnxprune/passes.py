"""Graph rewrites as passes: each states what it needs and what it guarantees, and
:meth:`Pass.run` checks both around the rewrite.

A pass is configured when it is made (its fields: traces, batch size, ...), then
``run(model)`` checks :meth:`Pass.pre` on the model, keeps a copy, calls :meth:`Pass.apply`
(which rewrites the model in place and returns what the caller wants back) and checks
:meth:`Pass.post` on the copy and the result. ``pre`` and ``post`` return the broken
conditions as sentences (empty: all hold); a broken condition is a bug in the pass, not
bad input, so it raises :class:`PassConditionError` (the CLI's exit 1) naming the pass.
``apply`` may note what it did on the instance for ``post`` to check.

Conditions should be cheap and real; the helpers below are the common ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import onnx

from onnxprune.weightstore import check_model

# above this a ModelProto cannot be serialised for onnx.checker (protobuf's 2 GiB limit)
_CHECKER_LIMIT = 1_800_000_000


class PassConditionError(RuntimeError):
    """A pass found its pre- or post-condition broken (an internal error)."""


class Pass:
    """A graph rewrite with checked pre- and post-conditions; subclasses set ``name`` and
    implement :meth:`apply`, and narrow :meth:`pre` and :meth:`post` to what they need."""

    name: ClassVar[str] = "pass"
    # the pass must keep a model that passed onnx.checker passing (checked on the real model
    # before the rewrite and after it: the copy ``post`` sees has no weight data)
    keeps_checker: ClassVar[bool] = False

    def pre(self, model: onnx.ModelProto) -> list[str]:
        """Broken pre-conditions of ``model`` (none by default)."""
        return []

    def apply(self, model: onnx.ModelProto) -> Any:
        """Rewrite ``model`` in place; the return value is handed back by :meth:`run`."""
        raise NotImplementedError

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        """Broken post-conditions (default: the graph outputs are unchanged)."""
        return outputs_changed(before, after)

    def run(self, model: onnx.ModelProto) -> Any:
        self._raise_if("pre-condition", self.pre(model))
        checked = self.keeps_checker and not checker_problems(model)
        before = skeleton(model)
        result = self.apply(model)
        broken = self.post(before, model)
        if checked:
            broken += checker_problems(model)
        self._raise_if("post-condition", broken)
        return result

    def _raise_if(self, what: str, broken: list[str]) -> None:
        if broken:
            more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
            raise PassConditionError(f"internal error in pass {self.name!r}: {what} failed: "
                                     f"{broken[0]}{more}")


class DerivePass(Pass):
    """A pass that builds a new model from ``model`` and leaves ``model`` as it was (the
    gated model, the cut): no copy is kept, and :meth:`post` sees the input and the new
    model (:meth:`model_of` finds it in what :meth:`apply` returns)."""

    def run(self, model: onnx.ModelProto) -> Any:
        self._raise_if("pre-condition", self.pre(model))
        result = self.apply(model)
        self._raise_if("post-condition", self.post(model, self.model_of(result)))
        return result

    def model_of(self, result: Any) -> onnx.ModelProto:
        return result


def unread_inputs(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """Each of the named graph inputs must be declared and read by a node."""
    declared = {vi.name for vi in model.graph.input}
    read = read_names(model.graph.node)
    return [f"input {name!r} is {'not read' if name in declared else 'not declared'}"
            for name in names if name not in declared or name not in read]


def inputs_lost(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Every graph input of ``before`` must still be a graph input, in the same order."""
    old = _names(before.graph.input)
    new = _names(after.graph.input)[:len(old)]
    return [] if old == new else [f"graph inputs changed from {old} to {new}"]


# --- conditions ---------------------------------------------------------------------------


def outputs_changed(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """The graph outputs (names, element types, shapes) must be the same; metadata and doc
    strings may go (graphsurgeon drops them)."""
    if [(o.name, o.type.SerializeToString()) for o in before.graph.output] == \
            [(o.name, o.type.SerializeToString()) for o in after.graph.output]:
        return []
    return [f"graph outputs changed from {_names(before.graph.output)} to "
            f"{_names(after.graph.output)}"]


def checker_problems(model: onnx.ModelProto) -> list[str]:
    """``onnx.checker.check_model`` must pass (skipped for models over protobuf's limit)."""
    if model.ByteSize() > _CHECKER_LIMIT:
        return []
    try:
        check_model(model)
    except onnx.checker.ValidationError as exc:
        text = str(exc).strip().splitlines()
        return [f"onnx.checker: {text[0] if text else type(exc).__name__}"]
    return []


def checker_broken(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """A model that passed ``onnx.checker`` must still pass it (one that did not, say for
    outputs declared without a shape, is not the pass's doing). Passes declare
    ``keeps_checker`` instead: :meth:`Pass.run` checks the real model before and after."""
    return [] if checker_problems(before) else checker_problems(after)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of 1 KiB or more keep their name, type and dims
    but no data: what post-conditions compare (outputs, nodes, initializer names), without a
    second copy of the weights (a BERT-base pass kept 415 MB more)."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL \
                or len(tensor.raw_data) >= _SKELETON_BYTES:
            stub = copy.graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
            stub.dims.extend(tensor.dims)
        else:
            copy.graph.initializer.add().CopyFrom(tensor)
    return copy


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if _repeated(field):
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)    # protobuf >= 5; ``label`` before
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


_SKELETON_BYTES = 1024


def unsorted_nodes(model: onnx.ModelProto) -> list[str]:
    """Every node input must be a graph input, an initializer or an earlier node's output."""
    graph = model.graph
    known = {vi.name for vi in graph.input} | {t.name for t in graph.initializer} | {""}
    broken = []
    for node in graph.node:
        broken += [f"node {node.name or node.op_type!r} reads {name!r} before it is made"
                   for name in node.input if name not in known]
        known.update(node.output)
    return broken


def dead_nodes(model: onnx.ModelProto) -> list[str]:
    """No node may be left whose outputs nobody reads (graph outputs and subgraphs count)."""
    read = {o.name for o in model.graph.output} | read_names(model.graph.node)
    return [f"node {node.name or node.op_type!r} feeds nothing" for node in model.graph.node
            if not any(name in read for name in node.output)]


def node_outputs_lost(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Every tensor a node made before must still be made (by some node) after."""
    made = {name for node in after.graph.node for name in node.output}
    return [f"tensor {name!r} is no longer computed" for node in before.graph.node
            for name in node.output if name and name not in made]


def read_names(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """The names ``nodes`` read, with those their subgraphs (nested too) read from the outer
    scope; "" for an omitted optional input."""
    read = set()
    for node in nodes:
        read.update(node.input)
        for attr in node.attribute:  # subgraphs read outer names too
            for sub in [attr.g, *attr.graphs]:
                read |= read_names(sub.node)
    return read


def _names(values: Iterable[onnx.ValueInfoProto]) -> list[str]:
    return [v.name for v in values]
