"""Layout op rules: labels through Reshape/Transpose/Split/Slice/Gather/Concat/Expand and the
pass-through ops, their cut fixes (unit level with a fake surgeon, and end to end)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper
from opgraphs import (
    BATCH,
    HEAD_DIM,
    SEQ,
    WIDTH,
    Builder,
    assert_cut_matches,
    attention_model,
    head_columns,
    labels_of,
    residual_out,
    zeroed,
)

import onnxprune
from onnxprune.errors import NotPrunableError
from onnxprune.ops import layout
from onnxprune.structure.discover import analyse


def test_reshape_and_transpose_carry_head_columns():
    flow, _ = labels_of(attention_model(), ["q", "k", "v"])
    q4 = flow.labels["q.4d"]
    assert q4.shape == (BATCH, SEQ, 2, HEAD_DIM)
    assert (q4[1, 2] == np.arange(WIDTH).reshape(2, HEAD_DIM)).all()
    k = flow.labels["k.heads"]  # [B, H, dh, T]: key h, channel d -> 8 + 4h + d
    assert k.shape == (BATCH, 2, HEAD_DIM, SEQ)
    assert (k[0, 1, :, 2] == WIDTH + 4 + np.arange(HEAD_DIM)).all()
    assert (flow.labels["ctx.flat"][0, 0] == 2 * WIDTH + np.arange(WIDTH)).all()


@pytest.mark.parametrize("fused", ["split", "slice", "gather"])
def test_fused_projection_parts_get_their_columns(fused):
    flow, _ = labels_of(attention_model(fused), ["qkv"])
    for i, name in enumerate(("q", "k", "v")):
        assert (flow.labels[name][1, 0].ravel() == i * WIDTH + np.arange(WIDTH)).all()
    if fused == "gather":
        assert flow.labels["qkv.5d"].shape == (BATCH, SEQ, 3, WIDTH)
    assert (flow.sinks[0].rows == 2 * WIDTH + np.arange(WIDTH)).all()


def test_expand_broadcasts_labels():
    flow, _ = labels_of(attention_model(expand=True), ["q", "k", "v"])
    assert (flow.labels["v.exp"] == flow.labels["v.heads"]).all()
    assert "v.exp_Expand" in flow.nodes


def _concat_model(extra: str) -> onnx.ModelProto:
    b = Builder(1)
    a = b.linear("x", "a", WIDTH, 4)
    if extra == "unsqueeze":
        a = b.op("Unsqueeze", [a, b.ints("ax", [0])], "a.u")
        a = b.op("Squeeze", [a, "ax"], "a.s")
        a = b.op("Cast", [a], "a.c", to=1)
    joined = b.op("Concat", [a, "x"], "joined", axis=-1)
    return residual_out(b, b.linear(joined, "down", 4 + WIDTH, WIDTH), 18)


@pytest.mark.parametrize("extra", ["", "unsqueeze"])
def test_concat_marks_untracked_parts(extra):
    flow, _ = labels_of(_concat_model(extra), ["a"])
    expected = np.r_[np.arange(4), np.full(WIDTH, -1)]
    assert (flow.labels["joined"][1, 2] == expected).all()
    assert (flow.sinks[0].rows == expected).all()


def test_output_projection_reading_non_values_is_not_prunable():
    block = analyse(_concat_model("")).structure.blocks
    assert all(b.kind != "attention" for b in block)


UNITS = {
    "head": (["attn0.head1"], lambda fused: {"o.W": (0, head_columns(1))}),
    "vo": (["attn0.vo0.1", "attn0.vo1.3"], lambda fused: {"o.W": (0, [1, 7])}),
    "qk": (["attn0.qk0.2", "attn0.qk1.0"], lambda fused: _qk_zeroed(fused, [2, 4])),
}


def _qk_zeroed(fused: str, cols: list[int]) -> dict:
    if fused == "separate":
        return {f"{n}.{p}": (axis, cols) for n in ("q", "k") for p, axis in (("W", 1), ("b", 0))}
    both = cols + [WIDTH + c for c in cols]
    return {"qkv.W": (1, both), "qkv.b": (0, both)}


@pytest.mark.parametrize("fused", ["separate", "split", "slice", "gather"])
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_cut_through_layout_ops_is_exact(fused, unit):
    model = attention_model(fused, expand=fused == "separate")
    units, oracle = UNITS[unit]
    if fused == "gather" and unit != "head":  # [B, T, 3, D]: Q, K and V widths are coupled
        with pytest.raises(NotPrunableError, match="coupled"):
            onnxprune.cut(model, units)
        return
    result = onnxprune.cut(model, units)
    assert result.verification.max_abs_diff < 1e-5
    assert_cut_matches(result, zeroed(model, oracle(fused)))
    if unit == "head":  # the merge reshape's H*dh became H'*dh, its -1 stays
        inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
        assert inits["ctx.flat_Reshape_shape_pruned"].tolist() == [-1, SEQ, WIDTH - HEAD_DIM]


# -- fixes with a fake surgeon: the protocol is all a rule sees --------------------------------
class FakeView:
    @staticmethod
    def const(tensor: gs.Tensor) -> np.ndarray | None:
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


class FakeSurgeon:
    def __init__(self, old: dict, new: dict, kept: np.ndarray | None = None):
        self.view, self.old, self.new, self.kept = FakeView(), old, new, kept

    def const(self, name: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(name, np.asarray(value))

    def traced(self, tensor: gs.Tensor) -> np.ndarray:
        return np.array(tensor.values, np.int64).reshape(-1).copy()

    def kept_positions(self, tensor: str, axis: int) -> np.ndarray:
        return self.kept


def _node(op: str, inputs: list, outputs: list[str], **attrs) -> gs.Node:
    data = gs.Variable("data", np.float32)
    consts = [gs.Constant(f"c{i}", np.asarray(v)) for i, v in enumerate(inputs)]
    return gs.Node(op, f"{op}_0", attrs, [data, *consts],
                   [gs.Variable(o, np.float32) for o in outputs])


KEPT = np.array([True, False, True, True, False, True])  # 6 positions, 4 kept


def test_gather_fix_remaps_indices():
    node = _node("Gather", [np.array([0, 3, 5])], ["out"], axis=1)
    layout.Gather().fix(FakeSurgeon({"data": (2, 6)}, {"data": (2, 4)}, KEPT), node)
    assert node.inputs[1].values.tolist() == [0, 2, 3]


def test_gather_of_a_pruned_position_is_refused():
    node = _node("Gather", [np.array([1])], ["out"], axis=1)
    with pytest.raises(NotPrunableError, match="selects pruned positions"):
        layout.Gather().fix(FakeSurgeon({"data": (2, 6)}, {"data": (2, 4)}, KEPT), node)


def test_slice_fix_counts_kept_positions_before_the_bounds():
    node = _node("Slice", [np.array([2]), np.array([6]), np.array([-1])], ["out"])
    layout.Slice().fix(FakeSurgeon({"data": (2, 6)}, {"data": (2, 4)}, KEPT), node)
    assert [t.values.tolist() for t in node.inputs[1:4]] == [[1], [4], [1]]


@pytest.mark.parametrize("as_attr", [False, True])
def test_split_fix_writes_the_new_sizes(as_attr):
    inputs, attrs = ([], {"split": [3, 3]}) if as_attr else ([np.array([3, 3])], {})
    node = _node("Split", inputs, ["a", "b"], axis=-1, **attrs)
    old = {"data": (2, 6), "a": (2, 3), "b": (2, 3)}
    new = {"data": (2, 4), "a": (2, 2), "b": (2, 2)}
    layout.Split().fix(FakeSurgeon(old, new), node)
    sizes = node.attrs["split"] if as_attr else node.inputs[1].values.tolist()
    assert sizes == [2, 2]


def test_pass_through_fix_is_a_no_op():
    node = _node("Unsqueeze", [np.array([0])], ["out"])
    layout.PassThrough().fix(FakeSurgeon({}, {}), node)
    assert node.inputs[1].values.tolist() == [0]

