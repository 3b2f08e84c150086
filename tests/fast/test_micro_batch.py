"""Gradient runs in parts: a batch whose activations would pass the budget runs a few
samples at a time, with the same per-sample losses and gate gradients."""

from __future__ import annotations

import numpy as np
import onnx
from test_search import attention_then_ffn

from onnxprune.batches import LossBatches
from onnxprune.data import load_or_synthesise
from onnxprune.losses import choose_loss
from onnxprune.scores import gradient
from onnxprune.scores.gradient import GradientPass, micro_batch
from onnxprune.structure.discover import analyse
from onnxprune.units import unit_kinds


def _dynamic_batch() -> onnx.ModelProto:
    """``attention_then_ffn`` with the batch dim of its input and output left open."""
    model = attention_then_ffn(16)
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def test_a_batch_in_parts_gives_the_same_per_sample_gradients():
    model = _dynamic_batch()
    analysis = analyse(model)
    data = load_or_synthesise(model, None, 12, 0, None)
    spec = choose_loss(model, data.targets, None)
    (inputs, targets), = LossBatches(model, data, spec, 12, 0).gradient_batches()
    grad = GradientPass(analysis, spec, unit_kinds())
    grad.part = None
    loss, whole = grad(inputs, targets)
    grad.part = 4                                    # 4 + 4 + 4
    loss_parts, parts = grad(inputs, targets)
    grad.part = 8                                    # 8 + a remainder of 4
    _, uneven = grad(inputs, targets)
    np.testing.assert_allclose(loss_parts, loss, rtol=1e-5, atol=1e-7)
    for gate, value in whole.items():
        assert parts[gate].shape == value.shape
        np.testing.assert_allclose(parts[gate], value, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(uneven[gate], value, rtol=1e-4, atol=1e-7)


def test_the_part_size_follows_the_activation_budget():
    analysis = analyse(_dynamic_batch())
    weights = {t.name for t in analysis.model.graph.initializer}
    per_sample = sum(v.nbytes for k, v in analysis.trace.items() if k not in weights)
    assert micro_batch(analysis, budget=per_sample * 5) == 4       # a power of two
    assert micro_batch(analysis, budget=1) == 1
    assert micro_batch(analysis, budget=per_sample * 64) == 64
    assert micro_batch(analyse(attention_then_ffn(16))) is None    # a batch fixed at 2


def test_lifted_weights_are_put_back_for_onnx_runtime(monkeypatch):
    """The gradient graph is built without the large weights and runs with them as
    constants again: the same per-sample gradients as with them in, at any thread count."""
    model = _dynamic_batch()
    analysis = analyse(model)
    data = load_or_synthesise(model, None, 8, 0, None)
    spec = choose_loss(model, data.targets, None)
    (inputs, targets), = LossBatches(model, data, spec, 8, 0).gradient_batches()
    whole = GradientPass(analysis, spec, unit_kinds(), threads=1)
    assert whole.weights == {}                       # this model's weights are all small
    monkeypatch.setattr(gradient, "LIFT_BYTES", 64)  # lift them too
    lifted = GradientPass(analysis, spec, unit_kinds(), threads=2)
    inits = {t.name for t in lifted.forward.graph.initializer}
    assert lifted.weights and not inits & set(lifted.weights)
    _, a = whole(inputs, targets)
    _, b = lifted(inputs, targets)
    for gate, value in a.items():
        np.testing.assert_array_equal(b[gate], value)
