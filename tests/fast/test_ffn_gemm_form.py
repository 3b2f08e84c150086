"""GPT-2's Conv1D FFN form: Gemm on a flattened [B·T, D] view, with reshapes around the
activation, found as an FFN block and cut exactly (zeroed-weights oracle)."""

from __future__ import annotations

from kindcases import block_of, check_cut
from opgraphs import BATCH, SEQ, WIDTH, Builder, zeroed

from onnxprune.units import Unit, unit_kind

HIDDEN = 6


def _gemm_ffn():
    b = Builder(0)
    flat = b.op("Reshape", ["x", b.ints("flat", [-1, WIDTH])], "x2d")
    up = b.op("Gemm", [flat, b.weight("up.W", WIDTH, HIDDEN), b.weight("up.b", HIDDEN)], "up")
    up3 = b.op("Reshape", [up, b.ints("up.shape", [BATCH, SEQ, HIDDEN])], "up3d")
    act = b.op("Tanh", [up3], "act")
    act2 = b.op("Reshape", [act, b.ints("act.flat", [-1, HIDDEN])], "act2d")
    down = b.op("Gemm", [act2, b.weight("down.W", HIDDEN, WIDTH),
                         b.weight("down.b", WIDTH)], "down")
    down3 = b.op("Reshape", [down, b.ints("down.shape", [BATCH, SEQ, WIDTH])], "down3d")
    y = b.op("Add", ["x", down3], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)})


def test_found_with_its_channels_and_removable():
    _, block = block_of(_gemm_ffn(), "ffn0")
    assert block.prunable and block.removable and block.channels == HIDDEN


def test_channels_cut_exactly():
    model = _gemm_ffn()
    analysis, block = block_of(model, "ffn0")
    ch = unit_kind("ch")
    oracle = zeroed(model, {"down.W": (0, [0, 4])})
    check_cut(model, [Unit(ch, "ffn0", (0,)), Unit(ch, "ffn0", (4,))], oracle,
              2 * ch.cost(analysis, block), 2)


def _fused_gate_up(split: str):
    """Phi-3's form: one projection [D, 2F], split into gate and up; up * silu(gate)."""
    b = Builder(0)
    both = b.linear("x", "gate_up", WIDTH, 2 * HIDDEN, bias=False)
    if split == "split":
        gate, up = b.op("Split", [both, b.ints("sizes", [HIDDEN, HIDDEN])], ["gate", "up"],
                        axis=-1)
    else:
        gate = b.op("Slice", [both, b.ints("g.lo", [0]), b.ints("g.hi", [HIDDEN]),
                              b.ints("g.ax", [-1])], "gate")
        up = b.op("Slice", [both, b.ints("u.lo", [HIDDEN]), b.ints("u.hi", [2 * HIDDEN]),
                            b.ints("u.ax", [-1])], "up")
    silu = b.op("Mul", [gate, b.op("Sigmoid", [gate], "sig")], "silu")
    down = b.linear(b.op("Mul", [up, silu], "gated"), "down", HIDDEN, WIDTH)
    y = b.op("Add", ["x", down], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)})


def test_fused_gate_up_channels_pair_gate_and_up_columns():
    for split in ("split", "slice"):
        model = _fused_gate_up(split)
        analysis, block = block_of(model, "ffn0")
        assert block.prunable and block.gated and block.channels == HIDDEN, split
        assert block.activation == "silu-gated"
        ch = unit_kind("ch")
        assert ch.cost(analysis, block) == 2 * WIDTH + WIDTH
        oracle = zeroed(model, {"down.W": (0, [1, 5])})
        check_cut(model, [Unit(ch, "ffn0", (1,)), Unit(ch, "ffn0", (5,))], oracle,
                  2 * ch.cost(analysis, block), 0)
