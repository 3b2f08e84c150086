"""Rotary embeddings (q·cos + rotate_half(q)·sin, within each head): heads and VO channels
cut exactly; QK channels are rotated in pairs, so they are left out with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from kindcases import block_of, check_cut
from opgraphs import HEAD_DIM, HEADS, SEQ, WIDTH, Builder, heads_split, zeroed

from onnxprune.errors import OnnxpruneError
from onnxprune.units import Unit, make_plan, unit_kind

HALF = HEAD_DIM // 2


def _rotate(b: Builder, t: str, name: str) -> str:
    """t·cos + rotate_half(t)·sin on [B, H, T, dh] (the Llama form)."""
    angles = np.arange(SEQ)[:, None] * (1.0 / 10000 ** (np.arange(HALF) / HALF))[None]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1).astype(np.float32)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1).astype(np.float32)
    lo = b.op("Slice", [t, b.ints(f"{name}.z", [0]), b.ints(f"{name}.h", [HALF]),
                        b.ints(f"{name}.a", [-1])], f"{name}.lo")
    hi = b.op("Slice", [t, b.ints(f"{name}.h2", [HALF]), b.ints(f"{name}.e", [HEAD_DIM]),
                        b.ints(f"{name}.a2", [-1])], f"{name}.hi")
    rot = b.op("Concat", [b.op("Neg", [hi], f"{name}.neg"), lo], f"{name}.rot", axis=-1)
    a = b.op("Mul", [t, b.const(f"{name}.cos", cos)], f"{name}.c")
    s = b.op("Mul", [rot, b.const(f"{name}.sin", sin)], f"{name}.s")
    return b.op("Add", [a, s], f"{name}.roped")


def _rotary_attention():
    b = Builder(3)
    q, k, v = (b.linear("x", n, WIDTH, WIDTH) for n in ("q", "k", "v"))
    qh = _rotate(b, heads_split(b, q, "q", [0, 2, 1, 3]), "qr")
    kh = _rotate(b, heads_split(b, k, "k", [0, 2, 1, 3]), "kr")
    kt = b.op("Transpose", [kh], "k.t", perm=[0, 1, 3, 2])
    vh = heads_split(b, v, "v", [0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [qh, kt], "qk"),
                          b.const("scale", np.float32(HEAD_DIM ** -0.5))], "scaled")
    ctx = b.op("MatMul", [b.op("Softmax", [scores], "p", axis=-1), vh], "ctx")
    flat = b.op("Reshape", [b.op("Transpose", [ctx], "ctx.t", perm=[0, 2, 1, 3]),
                            b.ints("ctx.shape", [-1, SEQ, WIDTH])], "ctx.flat")
    y = b.op("Add", ["x", b.linear(flat, "o", WIDTH, WIDTH)], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (2, SEQ, WIDTH)}, {"out": (2, SEQ, 3)})


def test_qk_channels_are_left_out_with_the_reason():
    analysis, block = block_of(_rotary_attention(), "attn0")
    qk = unit_kind("qk")
    assert block.heads == HEADS and block.channel_prunable
    assert "rotary embedding" in qk.refusal(block) and unit_kind("vo").refusal(block) is None
    with pytest.raises(OnnxpruneError, match="QK channels of attn0 cannot be cut: rotary"):
        make_plan([Unit(qk, "attn0", (h, 1)) for h in range(HEADS)], analysis.structure)


def test_heads_and_value_channels_cut_exactly_through_the_rotation():
    model = _rotary_attention()
    analysis, block = block_of(model, "attn0")
    head, vo = unit_kind("head"), unit_kind("vo")
    check_cut(model, [Unit(head, "attn0", (1,))],
              zeroed(model, {"o.W": (0, list(range(HEAD_DIM, 2 * HEAD_DIM)))}),
              head.cost(analysis, block), 3 * HEAD_DIM)
    check_cut(model, [Unit(vo, "attn0", (0, 3)), Unit(vo, "attn0", (1, 0))],
              zeroed(model, {"o.W": (0, [3, HEAD_DIM])}), 2 * vo.cost(analysis, block), 2)
