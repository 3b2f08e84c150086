"""Unit kind ``head`` (attn{i}.head{h}) on a hand-built attention block."""

from __future__ import annotations

import pytest
from kindcases import block_of, check_cut, check_gate_zeroes, check_name_round_trip
from opgraphs import HEAD_DIM, HEADS, WIDTH, attention_model, head_columns, zeroed

from onnxprune.errors import OnnxpruneError
from onnxprune.units import BlockBudget, Unit, make_plan, unit_kind

HEAD = unit_kind("head")


def test_name_shape_and_range():
    analysis, block = block_of(attention_model(), "attn0")
    check_name_round_trip(analysis, "head", "attn0", (1,), "attn0.head1")
    assert HEAD.shape(block) == (HEADS,)
    assert HEAD.refusal(block) is None
    with pytest.raises(OnnxpruneError, match=r"head 5 out of range \(0..1\)"):
        make_plan([Unit(HEAD, "attn0", (5,))], analysis.structure)


@pytest.mark.parametrize("fused", ["separate", "split", "gather"])
def test_cut_equals_zeroed_output_rows(fused):
    model = attention_model(fused)
    analysis, block = block_of(model, "attn0")
    oracle = zeroed(model, {"o.W": (0, head_columns(1))})
    cost = HEAD.cost(analysis, block)
    assert cost == HEAD_DIM * (WIDTH + WIDTH) + HEAD_DIM * (WIDTH + WIDTH)
    check_cut(model, [Unit(HEAD, "attn0", (1,))], oracle, cost, 3 * HEAD_DIM)


def test_gate_zeroes_the_head():
    analysis, _ = block_of(attention_model(), "attn0")
    check_gate_zeroes(analysis, [Unit(HEAD, "attn0", (0,))])


def test_every_head_removes_the_module():
    analysis, _ = block_of(attention_model(), "attn0")
    plan = make_plan([Unit(HEAD, "attn0", (h,)) for h in range(HEADS)], analysis.structure)
    assert plan.cuts["attn0"].whole and not plan.cuts["attn0"].removed


def test_a_kept_module_keeps_a_head():
    _analysis, block = block_of(attention_model(), "attn0")
    taken = BlockBudget(taken={"head": {0}})
    (cand,) = [c for c in HEAD.candidates(block, [0.1, 0.2], 5.0) if c.index == 1]
    assert HEAD.gain(cand, block, taken, {"head": 5.0}) == 0.0
    assert HEAD.gain(cand, block, BlockBudget(), {"head": 5.0}) == 5.0
