"""Unit kind ``kv`` (attn{i}.kv{g}) and query heads inside KV groups, on hand-built
grouped-query attention blocks: K/V repeated per group with Unsqueeze, Expand and Reshape
(``repeat_kv`` as exported), and the fused ONNX Attention op with ``kv_num_heads``."""

from __future__ import annotations

import numpy as np
import pytest
from kindcases import block_of, check_cut, check_gate_zeroes, check_name_round_trip
from opgraphs import (
    BATCH,
    SEQ,
    WIDTH,
    Builder,
    assert_cut_matches,
    attention_model,
    residual_out,
    zeroed,
)

import onnxprune
from onnxprune.errors import OnnxpruneError
from onnxprune.structure.discover import analyse
from onnxprune.units import BlockBudget, Unit, kinds_of, make_plan, parse_unit, unit_kind

KV = unit_kind("kv")
HEAD = unit_kind("head")
HEADS, DH = 4, WIDTH // 4      # 4 query heads of width 2 in the model width 8


def gqa_model(kv_heads: int = 2, seed: int = 0) -> object:
    """x + o(softmax(q kᵀ·s) v): q [B,T,4·2] in 4 heads, k and v [B,T,G·2] in G heads
    repeated to 4 as repeat_kv exports it (Unsqueeze, Expand, Reshape)."""
    b = Builder(seed)
    rep = HEADS // kv_heads
    q = b.linear("x", "q", WIDTH, HEADS * DH)
    k = b.linear("x", "k", WIDTH, kv_heads * DH)
    v = b.linear("x", "v", WIDTH, kv_heads * DH)

    def heads(t: str, name: str, n: int) -> str:
        r = b.op("Reshape", [t, b.ints(f"{name}.shape", [-1, SEQ, n, DH])], f"{name}.4d")
        return b.op("Transpose", [r], f"{name}.heads", perm=[0, 2, 1, 3])

    def repeat(t: str, name: str) -> str:
        u = b.op("Unsqueeze", [t, b.ints(f"{name}.axis", [2])], f"{name}.5d")
        e = b.op("Expand", [u, b.ints(f"{name}.target", [BATCH, kv_heads, rep, SEQ, DH])],
                 f"{name}.rep5d")
        return b.op("Reshape", [e, b.ints(f"{name}.flat", [BATCH, HEADS, SEQ, DH])],
                    f"{name}.rep")

    qh = heads(q, "q", HEADS)
    kh = repeat(heads(k, "k", kv_heads), "k")
    vh = repeat(heads(v, "v", kv_heads), "v")
    kt = b.op("Transpose", [kh], "k.t", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [qh, kt], "scores")
    scaled = b.op("Mul", [scores, b.const("scale", np.float32(DH ** -0.5))], "scaled")
    probs = b.op("Softmax", [scaled], "probs", axis=-1)
    ctx = b.op("MatMul", [probs, vh], "ctx")
    merged = b.op("Transpose", [ctx], "ctx.t", perm=[0, 2, 1, 3])
    flat = b.op("Reshape", [merged, b.ints("ctx.shape", [-1, SEQ, WIDTH])], "ctx.flat")
    return residual_out(b, b.linear(flat, "o", WIDTH, WIDTH), 18)


def gqa_attention_op_model(kv_heads: int = 2, seed: int = 0) -> object:
    """The fused ONNX Attention op (opset 23) with kv_num_heads < q_num_heads."""
    b = Builder(seed)
    q = b.linear("x", "q", WIDTH, HEADS * DH)
    k = b.linear("x", "k", WIDTH, kv_heads * DH)
    v = b.linear("x", "v", WIDTH, kv_heads * DH)
    att = b.op("Attention", [q, k, v], "att", q_num_heads=HEADS, kv_num_heads=kv_heads)
    return residual_out(b, b.linear(att, "o", WIDTH, WIDTH), 23)


def rows_of(heads: list[int]) -> list[int]:
    return [h * DH + d for h in heads for d in range(DH)]


def kv_cost(kv_units: int, q_heads: int) -> float:
    """Weights removed: Q columns and o rows per query head, K and V columns per group."""
    return q_heads * 2 * DH * WIDTH + kv_units * 2 * DH * WIDTH


def test_discovery_records_the_groups():
    analysis, block = block_of(gqa_model(), "attn0")
    assert block.prunable and block.removable
    assert (block.heads, block.kv_heads) == (HEADS, 2)
    assert block.groups.tolist() == [0, 0, 1, 1]
    assert block.k_labels.shape == (HEADS, DH)
    assert (block.k_labels[0] == block.k_labels[1]).all()      # shared by the group
    assert block.k_copies is not None and len(np.unique(block.k_copies)) == HEADS * DH
    assert not block.channel_prunable
    assert KV in kinds_of(block) and KV.shape(block) == (2,)
    assert KV.describe(block) == {"kv_heads": 2, "kv_groups": [0, 0, 1, 1]}
    check_name_round_trip(analysis, "kv", "attn0", (1,), "attn0.kv1")


def test_multi_head_blocks_have_no_kv_groups():
    analysis, block = block_of(attention_model(), "attn0")
    assert not block.grouped and block.kv_heads == block.heads
    assert KV not in kinds_of(block)
    with pytest.raises(OnnxpruneError, match="units of attn0 are"):
        parse_unit("attn0.kv0", {b.name: b for b in analysis.structure.blocks})


def test_kv_group_cut_equals_zeroed_output_rows():
    model = gqa_model()
    analysis, block = block_of(model, "attn0")
    assert KV.cost(analysis, block) == kv_cost(1, 2)
    oracle = zeroed(model, {"o.W": (0, rows_of([2, 3]))})
    check_cut(model, [Unit(KV, "attn0", (1,))], oracle, kv_cost(1, 2), 2 * DH + 2 * DH)


@pytest.mark.parametrize("heads", [[0, 3], [1, 2], [0, 2]])
def test_one_query_head_per_group_equals_zeroed_rows(heads):
    model = gqa_model()
    analysis, block = block_of(model, "attn0")
    assert HEAD.refusal(block) is None
    assert HEAD.cost(analysis, block) == kv_cost(1, 2) / 2    # a head's share of its group
    oracle = zeroed(model, {"o.W": (0, rows_of(heads))})
    check_cut(model, [Unit(HEAD, "attn0", (h,)) for h in heads], oracle, kv_cost(0, 2), 2 * DH)


def test_group_and_head_of_the_other_group():
    model = gqa_model()
    oracle = zeroed(model, {"o.W": (0, rows_of([0, 1, 3]))})
    units = [Unit(KV, "attn0", (0,)), Unit(HEAD, "attn0", (3,))]
    check_cut(model, units, oracle, kv_cost(1, 3), 3 * DH + 2 * DH)


def test_unequal_heads_are_refused_and_a_full_group_is_the_group():
    analysis, _ = block_of(gqa_model(), "attn0")
    with pytest.raises(OnnxpruneError, match=r"same number of query heads.*group 0: 1, "
                                             r"group 1: 0"):
        make_plan([Unit(HEAD, "attn0", (0,))], analysis.structure)
    plan = make_plan([Unit(HEAD, "attn0", (h,)) for h in (0, 1, 2)], analysis.structure)
    assert plan.cuts["attn0"].removed == {"kv": {(0,)}, "head": {(2,)}}    # a full group


def test_every_group_or_every_head_removes_the_module():
    analysis, _ = block_of(gqa_model(), "attn0")
    for units in ([Unit(KV, "attn0", (g,)) for g in range(2)],
                  [Unit(HEAD, "attn0", (h,)) for h in range(HEADS)],
                  [Unit(KV, "attn0", (0,)), Unit(HEAD, "attn0", (2,)),
                   Unit(HEAD, "attn0", (3,))]):
        plan = make_plan(units, analysis.structure)
        assert plan.cuts["attn0"].whole and not plan.cuts["attn0"].removed


def test_heads_of_a_removed_group_are_dropped():
    analysis, _ = block_of(gqa_model(), "attn0")
    plan = make_plan([Unit(KV, "attn0", (0,)), Unit(HEAD, "attn0", (1,))],
                     analysis.structure)
    assert plan.cuts["attn0"].removed == {"kv": {(0,)}}


@pytest.mark.parametrize(("key", "indices"), [("kv", [1]), ("head", [1, 2])])
def test_gate_zeroes_the_units(key, indices):
    analysis, _ = block_of(gqa_model(), "attn0")
    check_gate_zeroes(analysis, [Unit(unit_kind(key), "attn0", (i,)) for i in indices])


def test_kv_gate_at_zero_equals_the_cut():
    model = gqa_model()
    analysis = analyse(model)
    plan = make_plan([Unit(KV, "attn0", (0,))], analysis.structure)
    gated = onnxprune.gates.gate_model(analysis, [KV])
    from opgraphs import feeds, run
    x = feeds(model, 5)
    want = run(gated.model, {**x, **gated.feeds(plan)})
    got = run(onnxprune.cut(model, [Unit(KV, "attn0", (0,))], analysis=analysis).model, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_planning_keeps_a_group_and_plans_by_group():
    _, block = block_of(gqa_model(), "attn0")
    cands = KV.candidates(block, np.array([0.1, 0.2]), 5.0)
    assert [c.index for c in cands] == [0, 1]
    assert KV.gain(cands[1], block, BlockBudget(taken={"kv": {0}}), {"kv": 5.0}) == 0.0
    assert KV.gain(cands[1], block, BlockBudget(), {"kv": 5.0}) == 5.0
    heads = HEAD.candidates(block, np.array([0.1, 0.2, 0.3, 0.4]), 3.0)
    assert [(c.index, [u.name for u in c.units], c.cost) for c in heads] == [
        (0, ["attn0.head0", "attn0.head1"], 6.0), (1, ["attn0.head2", "attn0.head3"], 6.0)]
    assert heads[1].score == pytest.approx(0.7)
    assert HEAD.gain(heads[1], block, BlockBudget(), {"head": 3.0}) == 6.0
    assert HEAD.gain(heads[1], block, BlockBudget(taken={"kv": {1}}), {}) == 0.0
    assert KV.gain(cands[0], block, BlockBudget(taken={"head": {1}}), {}) == 0.0


def test_multi_query_attention():
    model = gqa_model(kv_heads=1)
    analysis, block = block_of(model, "attn0")
    assert (block.kv_heads, block.groups.tolist()) == (1, [0, 0, 0, 0])
    plan = make_plan([Unit(KV, "attn0", (0,))], analysis.structure)
    assert plan.cuts["attn0"].whole
    oracle = zeroed(model, {"o.W": (0, rows_of([1]))})
    check_cut(model, [Unit(HEAD, "attn0", (1,))], oracle, kv_cost(0, 1), DH)


def test_attention_op_with_kv_num_heads():
    model = gqa_attention_op_model()
    analysis, block = block_of(model, "attn0")
    assert (block.heads, block.kv_heads, block.groups.tolist()) == (HEADS, 2, [0, 0, 1, 1])
    assert "share key/value heads" in HEAD.refusal(block)
    oracle = zeroed(model, {"o.W": (0, rows_of([0, 1]))})
    result = onnxprune.cut(model, [Unit(KV, "attn0", (0,))], analysis=analysis)
    assert_cut_matches(result, oracle)
    att = next(n for n in result.model.graph.node if n.op_type == "Attention")
    attrs = {a.name: a.i for a in att.attribute if a.name.endswith("num_heads")}
    assert attrs == {"q_num_heads": 2, "kv_num_heads": 1}
