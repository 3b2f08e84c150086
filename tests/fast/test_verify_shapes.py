"""Verification runs at another batch than the analysis (dynamic dims must stay dynamic),
unless the original itself cannot: an export that baked its batch into a constant (a
TorchScript export with ``dynamic_axes`` over a model that reads the batch size) is still
verified, at the analysed shapes."""

from __future__ import annotations

from opgraphs import BATCH, SEQ, WIDTH, attention_model

import onnxprune
from onnxprune.structure.discover import analyse


def _baked_batch_model():
    model = attention_model(expand=True)     # Expand to [BATCH, ...]: a fixed batch inside
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_a_model_whose_dynamic_batch_is_not_dynamic_is_verified_at_its_own_batch():
    model = _baked_batch_model()
    analysis = analyse(model, {"x": (BATCH, SEQ, WIDTH)})
    result = onnxprune.cut(model, ["attn0.head1"], analysis=analysis)
    assert result.verification.batch == BATCH
    assert result.verification.max_abs_diff < 1e-4


def test_a_truly_dynamic_batch_is_verified_at_another_batch():
    model = attention_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    result = onnxprune.cut(model, ["attn0.head1"],
                           analysis=analyse(model, {"x": (BATCH, SEQ, WIDTH)}))
    assert result.verification.batch != BATCH
