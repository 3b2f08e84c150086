"""Input roles read from the graph, and synthesised inputs that fit them."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from opgraphs import Builder

from onnxprune.input_roles import InputRole, input_roles, synthesise


def _embedding_model():
    """ids -> Gather(word table 50); positions -> Cast -> Gather(16); token types -> Gather(2);
    a float mask multiplies the sum."""
    b = Builder(0)
    words = b.op("Gather", [b.weight("words", 50, 8), "input_ids"], "w")
    cast = b.op("Cast", ["position_ids"], "pos64", to=TensorProto.INT64)
    pos = b.op("Gather", [b.weight("positions", 16, 8), cast], "p")
    types = b.op("Gather", [b.weight("types", 2, 8), "token_type_ids"], "t")
    total = b.op("Add", [b.op("Add", [words, pos], "wp"), types], "e")
    mask = b.op("Unsqueeze", ["attention_mask", b.ints("ax", [-1])], "m")
    b.op("Mul", [total, mask], "out")
    model = b.model({}, {"out": (1, 4, 8)})
    model.graph.input.extend([
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, (1, 4)),
        helper.make_tensor_value_info("position_ids", TensorProto.INT32, (1, 4)),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, (1, 4)),
        helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, (1, 4)),
    ])
    return model


def test_roles_come_from_the_graph():
    roles = input_roles(_embedding_model())
    assert roles["input_ids"] == InputRole("token ids", 50)
    assert roles["position_ids"] == InputRole("positions", 16)
    assert roles["token_type_ids"] == InputRole("token types", 2)
    assert roles["attention_mask"] == InputRole("mask")
    assert roles["input_ids"].describe() == "token ids in [0, 50)"


def test_synthesised_inputs_fit_their_roles():
    rng = np.random.default_rng(0)
    ids = synthesise(InputRole("token ids", 50), (4, 64), np.int64, rng)
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 10
    positions = synthesise(InputRole("positions", 16), (2, 20), np.int32, rng)
    assert positions.dtype == np.int32 and positions.max() == 15
    assert (positions[0, :16] == np.arange(16)).all()
    assert (synthesise(InputRole("mask"), (2, 3), np.float16, rng) == 1).all()
    assert (synthesise(InputRole("token types", 2), (2, 3), np.int64, rng) == 0).all()
    values = synthesise(InputRole("values"), (1000,), np.float32, rng)
    assert values.dtype == np.float32 and 0.8 < values.std() < 1.2


def test_data_free_calibration_uses_the_roles_and_says_so():
    from onnxprune.data import load_or_synthesise

    model = _embedding_model()
    data = load_or_synthesise(model, None, samples=8, seed=0)
    ids = data.inputs["input_ids"]
    assert ids.shape == (8, 4) and ids.min() >= 0 and ids.max() < 50
    assert len(np.unique(ids)) > 5                  # not all the padding row
    assert (data.inputs["attention_mask"] == 1).all()
    assert data.synthesised["input_ids"] == "token ids in [0, 50)"


def test_ids_fused_into_ort_embed_layer_normalization_index_its_word_table():
    b = Builder(0)
    ids32 = b.op("Cast", ["input_ids"], "ids32", to=TensorProto.INT32)
    b.op("EmbedLayerNormalization", [ids32, "", b.weight("words", 30, 8),
                                     b.weight("positions", 16, 8), "", b.weight("g", 8),
                                     b.weight("beta", 8)], ["out", "mask_index"],
         domain="com.microsoft")
    model = b.model({}, {"out": (1, 4, 8)}, domains={"com.microsoft": 1})
    model.graph.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                           (1, 4)))
    assert input_roles(model)["input_ids"] == InputRole("token ids", 30)
