"""Unit kind ``attn`` (a whole attention module) on a hand-built attention block."""

from __future__ import annotations

from kindcases import block_of, check_cut, check_gate_zeroes, check_name_round_trip
from opgraphs import attention_model, zeroed

from onnxprune.units import BlockBudget, Unit, make_plan, module_kind, unit_kind

ATTN = unit_kind("attn")


def test_name_and_module_kind():
    analysis, block = block_of(attention_model(), "attn0")
    check_name_round_trip(analysis, "attn", "attn0", (), "attn0")
    assert module_kind(block) is ATTN and ATTN.whole and ATTN.shape(block) == ()


def test_cut_equals_zeroed_output_projection():
    model = attention_model()
    analysis, block = block_of(model, "attn0")
    oracle = zeroed(model, {"o.W": (0, list(range(8))), "o.b": (0, list(range(8)))})
    check_cut(model, [Unit(ATTN, "attn0")], oracle, ATTN.cost(analysis, block), 0)


def test_gate_zeroes_the_module():
    analysis, _ = block_of(attention_model(), "attn0")
    check_gate_zeroes(analysis, [Unit(ATTN, "attn0")])


def test_module_wins_over_its_heads_and_gains_what_is_left():
    analysis, block = block_of(attention_model(), "attn0")
    plan = make_plan([Unit(unit_kind("head"), "attn0", (0,)), Unit(ATTN, "attn0")],
                     analysis.structure)
    assert plan.cuts["attn0"].whole and not plan.cuts["attn0"].removed
    (cand,) = ATTN.candidates(block, 0.5, 100.0)
    assert ATTN.gain(cand, block, BlockBudget(spent=30.0), {}) == 70.0


def test_not_removable_block_is_refused_with_the_reason():
    _analysis, block = block_of(attention_model(), "attn0")
    block.removable, block.reason = False, "its output has several users"
    assert "cannot be removed whole: its output has several users" in ATTN.refusal(block)
    assert ATTN.limitation(block) == "not removable whole: its output has several users"
