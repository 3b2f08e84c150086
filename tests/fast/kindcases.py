"""Shared checks for the unit-kind tests: one hand-built block, a unit of the kind, and
what the kind says about it compared with what the cut really does."""

from __future__ import annotations

import onnx
import pytest
from opgraphs import assert_cut_matches

import onnxprune
from onnxprune.structure.discover import analyse
from onnxprune.units import Unit, make_plan, parse_unit, unit_kind


def block_of(model: onnx.ModelProto, name: str):
    analysis = analyse(model)
    return analysis, analysis.structure.block(name)


def check_name_round_trip(analysis, key: str, block: str, index: tuple[int, ...],
                          name: str) -> Unit:
    unit = Unit(unit_kind(key), block, index)
    assert unit.name == name
    blocks = {b.name: b for b in analysis.structure.blocks}
    assert parse_unit(name, blocks) == unit
    return unit


def check_cut(model: onnx.ModelProto, units: list[Unit], oracle: onnx.ModelProto,
              weights_removed: float, biases_removed: int) -> None:
    """The cut equals the zeroed-weights oracle and removes the kind's cost (weights) plus
    the listed bias entries."""
    result = onnxprune.cut(model, units, analysis=analyse(model))
    assert_cut_matches(result, oracle)
    removed = result.params_before - result.params_after
    assert removed == pytest.approx(weights_removed + biases_removed)


def check_gate_zeroes(analysis, units: list[Unit]) -> None:
    """The gate feeds of a plan zero exactly the gate entries the kind owns."""
    plan = make_plan(units, analysis.structure)
    gated = onnxprune.gates.gate_model(analysis, [units[0].kind])
    (gate,) = gated.gates
    value = gated.feeds(plan)[gate.input]
    zeros = {int(i) for i in (value.reshape(-1) == 0).nonzero()[0]}
    width = gate.width
    want = {u.index[0] * width + u.index[1] if width else (u.index[-1] if u.index else 0)
            for u in units}
    assert zeros == want
