"""Calibration losses as ONNX subgraphs (so onnx-ad can differentiate them) and in numpy.

The loss is always computed in float32: a float16 or float64 output is cast first and the
targets are float32 inputs, so a half-precision model's loss cannot overflow.

With targets the loss is the task loss: MSE or MAE for forecasts and regressions,
cross-entropy for class ids. Without targets it is self-distillation against the original
model's outputs on the same inputs: MSE, or KL on the softmax for classifier logits (in the
graph as soft cross-entropy, which differs from KL by a constant).

The graph gets one target input per output (``target.<output>``) and two outputs:
``onnxprune.sample_loss`` [N] (one loss per sample) and ``onnxprune.loss`` (their sum, the
value that is differentiated, so ∂/∂(per-sample gate) is that sample's gradient).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxprune.errors import OnnxpruneError

LOSSES = ("mse", "mae", "ce")
SAMPLE_LOSS = "onnxprune.sample_loss"
TOTAL_LOSS = "onnxprune.loss"
_CLASSIFIER_NAME = re.compile(r"logit|class|prob", re.IGNORECASE)


@dataclass(frozen=True)
class LossSpec:
    """``kind`` mse | mae | ce; ``distill``: the targets are the original model's outputs
    (for ce, its softmax)."""

    kind: str
    outputs: tuple[str, ...]
    distill: bool

    @property
    def describe(self) -> str:
        if not self.distill:
            return f"task {self.kind}"
        return "self-distillation " + ("KL on softmax" if self.kind == "ce" else self.kind)


def float_outputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [o for o in model.graph.output
            if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE,
                                                TensorProto.FLOAT16)]


def looks_like_classifier(output: onnx.ValueInfoProto) -> bool:
    dims = output.type.tensor_type.shape.dim
    return len(dims) == 2 and bool(_CLASSIFIER_NAME.search(output.name))


def choose_loss(model: onnx.ModelProto, targets: Mapping[str, np.ndarray],
                requested: str | None = None, skip: Iterable[str] = ()) -> LossSpec:
    """The loss for these targets (task) or none (self-distillation); ``requested`` wins.
    Outputs named in ``skip`` (key/value caches: state, not results) take no part."""
    if requested is not None and requested not in LOSSES:
        raise OnnxpruneError(f"--loss {requested!r}: choose one of {', '.join(LOSSES)}")
    skip = set(skip)
    outputs = [o for o in float_outputs(model) if o.name not in skip]
    if not outputs:
        raise OnnxpruneError("the model has no floating-point output to compute a loss on")
    if targets:
        names = tuple(o.name for o in outputs if o.name in targets)
        if not names:
            raise OnnxpruneError(f"calibration targets {sorted(targets)} match no float output "
                                 f"({', '.join(o.name for o in outputs)})")
        is_ids = any(np.issubdtype(np.asarray(targets[n]).dtype, np.integer) for n in names)
        kind = requested or ("ce" if is_ids else "mse")
        if is_ids and kind != "ce":
            raise OnnxpruneError(f"integer class targets need --loss ce, not {kind}")
        return LossSpec(kind, names, distill=False)
    names = tuple(o.name for o in outputs)
    classifier = all(looks_like_classifier(o) for o in outputs)
    return LossSpec(requested or ("ce" if classifier else "mse"), names, distill=True)


def target_name(output: str) -> str:
    return f"target.{output}"


def target_feeds(spec: LossSpec, targets: Mapping[str, np.ndarray],
                 outputs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Graph feeds for the loss targets: task targets as given (class ids as one-hot), or the
    original outputs (their softmax for ce) when distilling."""
    feeds = {}
    for name in spec.outputs:
        if spec.distill:
            value = np.asarray(outputs[name], dtype=np.float32)
            feeds[target_name(name)] = softmax(value) if spec.kind == "ce" else value
        else:
            value = np.asarray(targets[name])
            if spec.kind == "ce" and np.issubdtype(value.dtype, np.integer):
                k = outputs[name].shape[-1] if outputs is not None else int(value.max()) + 1
                value = np.eye(k, dtype=np.float32)[value.reshape(-1)]
            feeds[target_name(name)] = value.astype(np.float32)
    return feeds


def with_loss(model: onnx.ModelProto, spec: LossSpec) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the per-sample and total calibration loss."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_name = {o.name: o for o in graph.output}
    terms = []
    for i, name in enumerate(spec.outputs):
        rank = len(by_name[name].type.tensor_type.shape.dim)
        target = target_name(name)
        declared = onnx.ValueInfoProto()
        declared.CopyFrom(by_name[name])
        declared.name = target
        # the loss is computed in float32 whatever the output's type (no fp16 overflow)
        declared.type.tensor_type.elem_type = TensorProto.FLOAT
        graph.input.append(declared)
        value = name
        if by_name[name].type.tensor_type.elem_type != TensorProto.FLOAT:
            value = f"onnxprune.loss{i}.float"
            graph.node.append(helper.make_node("Cast", [name], [value], name=value,
                                               to=TensorProto.FLOAT))
        terms.append(_sample_loss(graph, spec.kind, value, target, rank, f"onnxprune.loss{i}",
                                  _opset(out)))
    if len(terms) == 1:
        graph.node.append(helper.make_node("Identity", terms, [SAMPLE_LOSS]))
    else:
        graph.node.append(helper.make_node("Sum", terms, [SAMPLE_LOSS]))
    graph.node.append(helper.make_node("ReduceSum", [SAMPLE_LOSS], [TOTAL_LOSS], keepdims=0)
                      if _opset(out) >= 13 else
                      helper.make_node("ReduceSum", [SAMPLE_LOSS], [TOTAL_LOSS], axes=[0],
                                       keepdims=0))
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(SAMPLE_LOSS, TensorProto.FLOAT, ["N"]),
                         helper.make_tensor_value_info(TOTAL_LOSS, TensorProto.FLOAT, [])])
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)


def _sample_loss(graph: onnx.GraphProto, kind: str, output: str, target: str, rank: int,
                 prefix: str, opset: int) -> str:
    def node(op: str, inputs: list[str], suffix: str, **attrs) -> str:
        name = f"{prefix}.{suffix}"
        graph.node.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def reduce(op: str, x: str, axes: list[int], suffix: str) -> str:
        # axes became an input in ReduceSum-13 and ReduceMean-18
        if opset >= (13 if op == "ReduceSum" else 18):
            return node(op, [x, _axes(graph, prefix, axes)], suffix, keepdims=0)
        return node(op, [x], suffix, axes=axes, keepdims=0)

    if kind == "ce":
        logp = node("LogSoftmax", [output], "logp", axis=-1)
        term = node("Mul", [target, logp], "tlogp")
        total = reduce("ReduceSum", term, [-1], "sum")
        per = node("Neg", [total], "ce")
        rank -= 1
    else:
        diff = node("Sub", [output, target], "diff")
        per = node("Mul", [diff, diff], "sq") if kind == "mse" else node("Abs", [diff], "abs")
    if rank <= 1:
        return per
    return reduce("ReduceMean", per, list(range(1, rank)), "mean")


def _axes(graph: onnx.GraphProto, prefix: str, axes: list[int]) -> str:
    name = f"{prefix}.axes{len(graph.initializer)}"
    graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(axes)], axes))
    return name


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def numpy_sample_loss(spec: LossSpec, outputs: Mapping[str, np.ndarray],
                      feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The same per-sample loss as the graph, from outputs and target feeds."""
    total = 0.0
    for name in spec.outputs:
        y = outputs[name].astype(np.float64)
        t = feeds[target_name(name)].astype(np.float64)
        if spec.kind == "ce":
            z = y - y.max(axis=-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
            per = -(t * logp).sum(axis=-1)
        else:
            per = (y - t) ** 2 if spec.kind == "mse" else np.abs(y - t)
        total = total + per.reshape(len(per), -1).mean(axis=1)
    return np.asarray(total)


@dataclass(frozen=True)
class Quality:
    """A figure of merit on the calibration data and which way is better."""

    name: str
    value: float
    higher_is_better: bool

    def drop_from(self, before: Quality) -> float:
        """Relative degradation from ``before`` (positive = worse)."""
        if before.value == 0:
            return (before.value - self.value) if self.higher_is_better else self.value
        change = (self.value - before.value) / abs(before.value)
        return -change if self.higher_is_better else change


def quality(spec: LossSpec, outputs: Mapping[str, np.ndarray],
            targets: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Quality:
    """Task metric with targets (accuracy for classes, else the loss); without targets,
    agreement with the original's top class (classifiers) or the relative output error."""
    name = spec.outputs[0]
    y = np.asarray(outputs[name], dtype=np.float64)
    if spec.distill:
        ref = np.asarray(reference[name], dtype=np.float64)
        if spec.kind == "ce":
            return Quality("top1_agreement", float((y.argmax(-1) == ref.argmax(-1)).mean()), True)
        err = float(((y - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30))
        return Quality("relative_error", err, False)
    t = np.asarray(targets[name])
    if spec.kind == "ce":
        ids = t if np.issubdtype(t.dtype, np.integer) else t.argmax(-1)
        top = y.argmax(-1).reshape(-1)   # a class per sample, or per position of a sequence
        if top.size != ids.size:
            raise OnnxpruneError(f"--loss ce: output {name} gives {top.size} class "
                                 f"prediction(s), its targets {ids.size} class(es)")
        return Quality("accuracy", float((top == ids.reshape(-1)).mean()), True)
    if spec.kind == "mae":
        return Quality("mae", float(np.abs(y - t).mean()), False)
    return Quality("mse", float(((y - t) ** 2).mean()), False)
