"""Unit kind ``ffn`` (a whole feed-forward module) on a hand-built FFN block."""

from __future__ import annotations

from kindcases import block_of, check_cut, check_gate_zeroes, check_name_round_trip
from opgraphs import WIDTH, ffn_model, zeroed

from onnxprune.units import Unit, module_kind, unit_kind

FFN = unit_kind("ffn")


def test_name_and_module_kind():
    analysis, block = block_of(ffn_model(), "ffn0")
    check_name_round_trip(analysis, "ffn", "ffn0", (), "ffn0")
    assert module_kind(block) is FFN and "auto" in FFN.granularities


def test_cut_equals_zeroed_down_projection():
    model = ffn_model()
    analysis, block = block_of(model, "ffn0")
    oracle = zeroed(model, {"down.W": (0, list(range(6))), "down.b": (0, list(range(WIDTH)))})
    check_cut(model, [Unit(FFN, "ffn0")], oracle, FFN.cost(analysis, block), 0)


def test_gate_zeroes_the_module():
    analysis, _ = block_of(ffn_model(), "ffn0")
    check_gate_zeroes(analysis, [Unit(FFN, "ffn0")])
