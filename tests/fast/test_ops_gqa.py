"""``com.microsoft`` ``GroupQueryAttention`` (ONNX Runtime's fused grouped-query attention) on
a hand-built decoder layer: separate or packed Q/K/V projections, with or without a past
key/value cache and the op's rotary embedding. ``seqlens_k`` and ``total_sequence_length``
are computed in the graph from the input shapes, as the GenAI model builder computes them
from the attention mask. The oracle for every cut is the same model with the removed query
heads' output-projection rows zeroed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from opgraphs import Builder, run, zeroed

import onnxprune
from onnxprune.structure.discover import analyse
from onnxprune.units import Unit, unit_kind

BATCH, SEQ, PAST, WIDTH = 2, 3, 4, 16
DECODE = 1     # with a past, the CPU kernel takes batches of one new token per sequence
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16   # the CPU kernel: a multiple of 8 (16 with rotary)
MAX_POSITIONS = 16


def gqa_model(packed: bool = False, past: bool = False, rotary: bool = False,
              seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    q_width, kv_width = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    if packed:
        qkv = [b.linear("x", "qkv", WIDTH, q_width + 2 * kv_width, bias=False), "", ""]
    else:
        qkv = [b.linear("x", "q", WIDTH, q_width, bias=False),
               b.linear("x", "k", WIDTH, kv_width, bias=False),
               b.linear("x", "v", WIDTH, kv_width, bias=False)]
    seq = b.op("Gather", [b.op("Shape", ["x"], "x.shape"), b.ints("one", [1])], "seq")
    total = b.op("Add", [seq, b.op("Gather", [b.op("Shape", ["past_k"], "past.shape"),
                                             b.ints("two", [2])], "past_len")], "total") \
        if past else seq
    last = b.op("Sub", [total, b.ints("one_again", [1])], "last")
    batch = b.op("Gather", [b.op("Shape", ["x"], "x.shape2"), b.ints("zero", [0])], "batch")
    seqlens = b.op("Cast", [b.op("Expand", [last, batch], "last.b")], "seqlens",
                   to=TensorProto.INT32)
    total32 = b.op("Cast", [b.op("Squeeze", [total, b.ints("axis0", [0])], "total.s")],
                   "total32", to=TensorProto.INT32)
    inputs = [*qkv, "past_k" if past else "", "past_v" if past else "", seqlens, total32]
    attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS}
    if rotary:
        angles = np.outer(np.arange(MAX_POSITIONS), 1.0 / 10000 ** (
            np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32)
        inputs += [b.const("cos", np.cos(angles)), b.const("sin", np.sin(angles))]
        attrs["do_rotary"] = 1
    outputs = ["ctx", "present_k", "present_v"] if past else ["ctx"]
    b.op("GroupQueryAttention", inputs, outputs, domain="com.microsoft", **attrs)
    y = b.op("Add", ["x", b.linear("ctx", "o", q_width, WIDTH)], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    cache = {"past_k": (BATCH, KV_HEADS, "past", HEAD_DIM),
             "past_v": (BATCH, KV_HEADS, "past", HEAD_DIM)} if past else {}
    present = {"present_k": (BATCH, KV_HEADS, "total", HEAD_DIM),
               "present_v": (BATCH, KV_HEADS, "total", HEAD_DIM)} if past else {}
    seq = DECODE if past else SEQ
    return b.model({"x": (BATCH, seq, WIDTH), **cache}, {"out": (BATCH, seq, 3), **present},
                   domains={"com.microsoft": 1})


def _feeds(past: bool, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((BATCH, DECODE if past else SEQ, WIDTH)
                                      ).astype(np.float32)}
    if past:
        feeds |= {n: rng.standard_normal((BATCH, KV_HEADS, PAST, HEAD_DIM)).astype(np.float32)
                  for n in ("past_k", "past_v")}
    return feeds


def _heads_rows(heads: list[int]) -> list[int]:
    return [h * HEAD_DIM + c for h in heads for c in range(HEAD_DIM)]


def _dims(value_info) -> list:
    return [d.dim_value or d.dim_param for d in value_info.type.tensor_type.shape.dim]


def _attrs(model: onnx.ModelProto) -> dict:
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("past", [False, True])
def test_discovery_counts_heads_groups_and_caches(packed, past):
    block = analyse(gqa_model(packed, past)).structure.block("attn0")
    assert block.prunable, block.reason
    assert (block.heads, block.kv_heads, block.qk_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert block.groups.tolist() == [0, 0, 1, 1]
    assert not block.channel_prunable
    assert block.cache == ({"past_k": "present_k", "past_v": "present_v"} if past else {})
    assert block.removable


def test_equal_head_size_reason_without_groups():
    """With as many key/value heads as query heads the op is plain multi-head attention,
    and channels are still left out: the op has one head size for Q, K and V."""
    global KV_HEADS
    saved, KV_HEADS = KV_HEADS, HEADS
    try:
        block = analyse(gqa_model()).structure.block("attn0")
    finally:
        KV_HEADS = saved
    assert block.prunable and not block.grouped
    assert "one head size" in block.channel_reason


UNITS = {
    "heads, one per group": ([("head", (0,)), ("head", (3,))], [0, 3], (2, 2)),
    "a whole group": ([("kv", (1,))], [2, 3], (2, 1)),
}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("past", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("case", list(UNITS))
def test_cut_matches_the_zeroed_oracle(packed, past, rotary, case):
    units, heads, (kept_heads, kept_groups) = UNITS[case]
    model = gqa_model(packed, past, rotary)
    result = onnxprune.cut(model, [Unit(unit_kind(k), "attn0", i) for k, i in units],
                           analysis=analyse(model))
    assert result.verification.max_abs_diff < 1e-4
    assert (_attrs(result.model)["num_heads"], _attrs(result.model)["kv_num_heads"]) == \
        (kept_heads, kept_groups)
    oracle = zeroed(model, {"o.W": (0, _heads_rows(heads))})
    feeds = _feeds(past)
    cut_feeds = dict(feeds)
    if past:
        groups = sorted({h // (HEADS // KV_HEADS) for h in range(HEADS) if h not in heads})
        cut_feeds |= {n: feeds[n][:, groups] for n in ("past_k", "past_v")}
        ins = {i.name: _dims(i) for i in result.model.graph.input}
        assert ins["past_k"] == [BATCH, kept_groups, "past", HEAD_DIM]
    got = run(result.model, cut_feeds)
    want = run(oracle, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    if past:
        assert got[1].shape == (BATCH, kept_groups, PAST + DECODE, HEAD_DIM)


def test_unequal_heads_per_group_are_refused():
    model = gqa_model()
    with pytest.raises(onnxprune.OnnxpruneError, match="group"):
        onnxprune.cut(model, ["attn0.head0"], analysis=analyse(model))


def test_main_job_prunes_heads_of_the_fused_op():
    model = gqa_model(past=True, rotary=True)
    pruned, report = onnxprune.prune(model, ratio=0.3, samples=4, seed=0,
                                     shapes={"past_k": (BATCH, KV_HEADS, PAST, HEAD_DIM)})
    assert report.removed
    assert report.cache_shapes["past_k"][1] <= KV_HEADS
    assert np.isfinite(run(pruned, {**_feeds(True), **{
        n: np.zeros((BATCH, report.cache_shapes[n][1], 0, HEAD_DIM), np.float32)
        for n in ("past_k", "past_v")}})[0]).all()
