"""onnxprune.protostream: loading with big initializers stubbed, saving with them filled back,
both by walking the protobuf wire format; byte equality with onnx's own load and serialize."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import OnnxpruneError
from onnxprune.protostream import (
    _encode_varint,
    _fields,
    _Malformed,
    _read_varint,
    _rewrite,
    load_stubbed,
    save_filled,
)

MIN_BYTES = 10_000


def _model() -> onnx.ModelProto:
    """MatMul/Add/Cast/If over big (300x300 float32 and float16) and small initializers, the
    If's then-branch with a big initializer of its own, plus doc strings, metadata, value_info,
    a sparse initializer and a quantization annotation."""
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((300, 300)).astype(np.float32), "W1")
    half = numpy_helper.from_array(rng.standard_normal((300, 300)).astype(np.float16), "W2")
    bias = numpy_helper.from_array(rng.standard_normal(300).astype(np.float32), "B1")
    tiny = numpy_helper.from_array(np.arange(4, dtype=np.int64), "tiny")
    cond = numpy_helper.from_array(np.array(True), "cond")
    inner = numpy_helper.from_array(rng.standard_normal((300, 300)).astype(np.float32), "W_in")
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h5", "W_in"], ["t_out"])], "then", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 300])], [inner])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h5"], ["e_out"])], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 300])])
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "B1"], ["h2"]),
        helper.make_node("Cast", ["h2"], ["h3"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["h3", "W2"], ["h4"]),
        helper.make_node("Cast", ["h4"], ["h5"], to=TensorProto.FLOAT),
        helper.make_node("If", ["cond"], ["Y"], then_branch=then_branch,
                         else_branch=else_branch),
    ]
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("S_values", TensorProto.FLOAT, [2], [1.0, 2.0]),
        helper.make_tensor("S_indices", TensorProto.INT64, [2], [0, 5]), [10])
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 300])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 300])],
        [big, bias, half, tiny, cond], doc_string="the graph",
        value_info=[helper.make_tensor_value_info("h1", TensorProto.FLOAT, [1, 300])],
        sparse_initializer=[sparse])
    annotation = graph.quantization_annotation.add(tensor_name="h1")
    annotation.quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="B1")
    graph.metadata_props.add(key="graph_key", value="graph_value")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="test", doc_string="the model")
    model.metadata_props.add(key="author", value="tests")
    return model


def _saved(tmp_path, model: onnx.ModelProto, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _stub(tensor: TensorProto) -> TensorProto:
    stub = TensorProto()
    stub.CopyFrom(tensor)
    stub.ClearField("raw_data")
    stub.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"),
                       ("length", str(len(tensor.raw_data)))):
        stub.external_data.add(key=key, value=value)
    return stub


def test_identity_take_equals_onnx_load(tmp_path):
    path = _saved(tmp_path, _model())
    seen: list[str] = []

    def take(tensor: TensorProto) -> TensorProto:
        seen.append(tensor.name)
        return tensor

    loaded = load_stubbed(path, take, MIN_BYTES)
    assert loaded.SerializeToString() == onnx.load(str(path)).SerializeToString()
    assert seen == ["W1", "W2"]                  # main-graph big ones only, in file order
    assert load_stubbed(path, take, 0).SerializeToString() == path.read_bytes()


def test_take_replaces_exactly_the_big_main_graph_initializers(tmp_path):
    model = _model()
    path = _saved(tmp_path, model)
    original = {t.name: t for t in model.graph.initializer}
    given: dict[str, TensorProto] = {}

    def take(tensor: TensorProto) -> TensorProto:
        given[tensor.name] = tensor
        return _stub(tensor)

    # the boundary is inclusive: a tensor of exactly min_bytes is offered
    min_bytes = original["W2"].ByteSize()
    loaded = load_stubbed(path, take, min_bytes)
    big = {name for name, t in original.items() if t.ByteSize() >= min_bytes}
    assert big == set(given) == {"W1", "W2"}
    for name, tensor in given.items():
        assert tensor.SerializeToString() == original[name].SerializeToString()
    for tensor in loaded.graph.initializer:
        want = _stub(original[tensor.name]) if tensor.name in big else original[tensor.name]
        assert tensor.SerializeToString() == want.SerializeToString()
    assert [t.name for t in loaded.graph.initializer] == [t.name for t in model.graph.initializer]
    # everything else, the If node with its subgraph's own initializer included, is as it was
    for field in ("node", "input", "output", "value_info", "sparse_initializer",
                  "metadata_props", "quantization_annotation"):
        assert getattr(loaded.graph, field) == getattr(model.graph, field), field
    then_branch = next(a.g for a in loaded.graph.node[-1].attribute if a.name == "then_branch")
    assert then_branch.initializer[0].name == "W_in" and then_branch.initializer[0].raw_data
    loaded.graph.ClearField("initializer")
    model.graph.ClearField("initializer")
    assert loaded.SerializeToString() == model.SerializeToString()


def test_save_filled_with_nothing_filled_writes_serialize_to_string(tmp_path):
    model = _model()
    calls: list[str] = []

    def fill(tensor: TensorProto) -> None:
        calls.append(tensor.name)

    save_filled(model, tmp_path / "out.onnx", fill)
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString()
    names = [t.name for t in model.graph.initializer]
    assert calls == names + names                # once to size, once to write


def test_save_filled_keeps_unknown_fields_and_their_place(tmp_path):
    model = _model()
    # fields a newer onnx might write: varint, fixed64, fixed32, bytes, in model and graph
    extra = (_encode_varint(1000 << 3) + _encode_varint(2**40) + _encode_varint(1001 << 3 | 1)
             + bytes(range(8)) + _encode_varint(1002 << 3 | 5) + b"abcd"
             + _encode_varint(1003 << 3 | 2) + b"\x03xyz")
    model.graph.MergeFromString(extra)
    model.MergeFromString(extra)
    save_filled(model, tmp_path / "out.onnx", lambda tensor: None)
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString()


def test_stub_then_fill_round_trips(tmp_path):
    model = _model()
    path = _saved(tmp_path, model)
    store: dict[str, bytes] = {}

    def take(tensor: TensorProto) -> TensorProto:
        store[tensor.name] = tensor.raw_data
        return _stub(tensor)

    stubbed = load_stubbed(path, take, MIN_BYTES)
    assert set(store) == {"W1", "W2"} and stubbed.ByteSize() < model.ByteSize() // 2

    def fill(tensor: TensorProto) -> TensorProto | None:
        if tensor.name not in store:
            return None
        full = TensorProto()
        full.CopyFrom(tensor)
        full.ClearField("data_location")
        full.ClearField("external_data")
        full.raw_data = store[tensor.name]
        return full

    out = tmp_path / "filled.onnx"
    save_filled(stubbed, out, fill)
    assert onnx.load(str(out)).SerializeToString() == model.SerializeToString()
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("where", ["inside W1", "first byte", "last byte"])
def test_truncated_file_is_refused_in_one_line(tmp_path, where):
    model = _model()
    data = model.SerializeToString()
    cut = {"inside W1": data.find(model.graph.initializer[0].raw_data) + 1000,
           "first byte": 1, "last byte": len(data) - 1}[where]
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:cut])
    with pytest.raises(OnnxpruneError) as info:
        load_stubbed(path, lambda tensor: tensor, MIN_BYTES)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("data", [
    b"\x0f",                                          # wire type 7
    b"\x3a\x05\xff\xff",                              # graph longer than the file
    b"\x08" + b"\xff" * 10 + b"\x01",                 # varint longer than 10 bytes
    b"\x3a\x16\x2a\x14" + b"\xff" * 20,               # an initializer that is not a tensor
    b"\x3a\x03\x0a\x01\xff",                          # a node that is not a node
], ids=["wire type", "overrun", "long varint", "bad tensor", "bad node"])
def test_malformed_file_is_refused_in_one_line(tmp_path, data):
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(OnnxpruneError) as info:
        load_stubbed(path, lambda tensor: tensor, 0)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**31, 2**31 + 5, 2**32,
                                   2**35 + 7, 2**63, 2**64 - 1])
def test_varint_round_trips(value):
    encoded = _encode_varint(value)
    stream = io.BytesIO(encoded + b"\x01")
    assert _read_varint(stream) == value and stream.tell() == len(encoded)


def test_varint_known_encodings():
    assert _encode_varint(300) == b"\xac\x02"
    assert _encode_varint(2**31) == b"\x80\x80\x80\x80\x08"
    assert _encode_varint(3 * 2**30 + 1) == b"\x81\x80\x80\x80\x0c"
    assert _read_varint(io.BytesIO(b"\x81\x80\x80\x80\x0c")) == 3 * 2**30 + 1
    assert _encode_varint(-1) == b"\xff" * 9 + b"\x01"
    with pytest.raises(_Malformed):
        _read_varint(io.BytesIO(b"\x80\x80"))         # ends inside the varint
    with pytest.raises(_Malformed):
        _read_varint(io.BytesIO(b"\xff" * 11))


def test_lengths_and_offsets_past_2_gib(tmp_path):
    # a length of 3 GiB is read whole and refused against the real end, not wrapped around
    path = tmp_path / "long.onnx"
    path.write_bytes(b"\x3a" + _encode_varint(3 * 2**30) + b"\x00" * 16)
    with open(path, "rb") as f, pytest.raises(_Malformed, match=f"ends at {3 * 2**30 + 6}"):
        list(_fields(f, 0, path.stat().st_size))
    # a model 3 GiB into a sparse file is walked with seeks alone
    model = _model()
    data = model.SerializeToString()
    start = 3 * 2**30
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.seek(start)
        f.write(data)
    with open(sparse, "rb") as f:
        fields = list(_fields(f, start, start + len(data)))
        assert fields[0][2] == start and fields[-1][4] == start + len(data)
        kept = _rewrite(f, start, start + len(data), 7, lambda payload, end: None)
    assert kept == data


def test_load_reads_one_big_tensor_at_a_time(tmp_path, monkeypatch):
    import onnxprune.protostream as protostream

    path = _saved(tmp_path, _model())
    reads: list[int] = []

    class Recording(io.FileIO):
        def read(self, size: int = -1) -> bytes:
            data = super().read(size)
            reads.append(len(data))
            return data

    monkeypatch.setattr(protostream, "open", lambda name, mode: Recording(name, mode),
                        raising=False)
    stubbed = load_stubbed(path, _stub, MIN_BYTES)
    w1, _, w2 = (t.ByteSize() for t in onnx.load(str(path)).graph.initializer[:3])
    remainder = path.stat().st_size - w1 - w2      # the nodes (and If subgraph) read as bytes
    assert w1 in reads and w2 in reads
    assert max(reads) <= max(w1, remainder) < path.stat().st_size // 2
    assert sum(reads) < path.stat().st_size + 1000  # each byte read once (varints aside)
    assert stubbed.graph.initializer[0].data_location == TensorProto.EXTERNAL
