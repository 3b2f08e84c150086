"""Key/value-cache attention (decoders exported with past inputs and present outputs) on a
hand-built block: K = Concat(past_k, k_new), V = Concat(past_v, v_new) along the sequence
axis, past inputs [B, H, P, d] and present outputs as graph outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from opgraphs import (
    BATCH,
    HEAD_DIM,
    HEADS,
    SEQ,
    WIDTH,
    Builder,
    head_columns,
    heads_split,
    run,
    zeroed,
)

import onnxprune
from onnxprune.structure.discover import analyse
from onnxprune.units import Unit, unit_kind

PAST = 5
HEAD = unit_kind("head")


def kv_cache_model(seed: int = 0, leak: bool = False):
    """The cached block; ``leak`` also returns the new keys alone (not a cache: refused)."""
    b = Builder(seed)
    q, k, v = (b.linear("x", n, WIDTH, WIDTH) for n in ("q", "k", "v"))
    qh = heads_split(b, q, "q", [0, 2, 1, 3])
    kh = heads_split(b, k, "k", [0, 2, 1, 3])
    vh = heads_split(b, v, "v", [0, 2, 1, 3])
    keys = b.op("Concat", ["past_k", kh], "present_k", axis=2)
    values = b.op("Concat", ["past_v", vh], "present_v", axis=2)
    kt = b.op("Transpose", [keys], "keys.t", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [qh, kt], "scores")
    scaled = b.op("Mul", [scores, b.const("scale", np.float32(HEAD_DIM ** -0.5))], "scaled")
    probs = b.op("Softmax", [scaled], "probs", axis=-1)
    ctx = b.op("MatMul", [probs, values], "ctx")
    merged = b.op("Transpose", [ctx], "ctx.t", perm=[0, 2, 1, 3])
    flat = b.op("Reshape", [merged, b.ints("ctx.shape", [-1, SEQ, WIDTH])], "ctx.flat")
    y = b.op("Add", ["x", b.linear(flat, "o", WIDTH, WIDTH)], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    cache = (BATCH, HEADS, "past", HEAD_DIM)
    present = (BATCH, HEADS, "total", HEAD_DIM)
    extra = {kh: (BATCH, HEADS, SEQ, HEAD_DIM)} if leak else {}
    return b.model({"x": (BATCH, SEQ, WIDTH), "past_k": cache, "past_v": cache},
                   {"out": (BATCH, SEQ, 3), "present_k": present, "present_v": present,
                    **extra})


def _feeds(seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((BATCH, SEQ, WIDTH)).astype(np.float32),
            **{n: rng.standard_normal((BATCH, HEADS, PAST, HEAD_DIM)).astype(np.float32)
               for n in ("past_k", "past_v")}}


def _dims(value_info) -> list:
    return [d.dim_value or d.dim_param for d in value_info.type.tensor_type.shape.dim]


def test_discovery_finds_the_cached_block():
    block = analyse(kv_cache_model()).structure.block("attn0")
    assert block.prunable, block.reason
    assert block.heads == HEADS and block.qk_dim == HEAD_DIM and block.vo_dim == HEAD_DIM
    assert block.cache == {"past_k": "present_k", "past_v": "present_v"}
    assert block.removable


@pytest.mark.parametrize("head", [0, 1])
def test_head_cut_shrinks_the_cache_and_matches_the_zeroed_oracle(head):
    model = kv_cache_model()
    result = onnxprune.cut(model, [Unit(HEAD, "attn0", (head,))], analysis=analyse(model))
    graph = result.model.graph
    ins, outs = {i.name: i for i in graph.input}, {o.name: o for o in graph.output}
    assert _dims(ins["past_k"]) == _dims(ins["past_v"]) == [BATCH, HEADS - 1, "past", HEAD_DIM]
    assert _dims(outs["present_k"]) == [BATCH, HEADS - 1, "total", HEAD_DIM]
    assert _dims(outs["out"]) == [BATCH, SEQ, 3]
    oracle = zeroed(model, {"o.W": (0, head_columns(head))})
    feeds = _feeds()
    kept = [h for h in range(HEADS) if h != head]
    cut_feeds = {**feeds, **{n: feeds[n][:, kept] for n in ("past_k", "past_v")}}
    got = dict(zip([o.name for o in graph.output], run(result.model, cut_feeds)))
    want = dict(zip([o.name for o in model.graph.output], run(oracle, feeds)))
    np.testing.assert_allclose(got["out"], want["out"], rtol=1e-4, atol=1e-5)
    for name in ("present_k", "present_v"):
        assert got[name].shape == (BATCH, HEADS - 1, PAST + SEQ, HEAD_DIM)
        np.testing.assert_allclose(got[name], want[name][:, kept], rtol=1e-4, atol=1e-5)


def test_without_a_cache_nothing_changes():
    from opgraphs import attention_model
    block = analyse(attention_model()).structure.block("attn0")
    assert block.cache == {}


def test_a_labelled_output_that_is_not_a_cache_is_still_refused():
    block = analyse(kv_cache_model(leak=True)).structure.block("attn0")
    assert not block.prunable
    assert "reaches graph output 'k.heads'" in block.reason


def test_channel_cuts_shrink_the_cache_channel_axis():
    """QK channels (different ones per head) shrink the key cache, VO channels the value
    cache; verification feeds the cut model the past with those entries deleted."""
    model = kv_cache_model()
    result = onnxprune.cut(model, ["attn0.qk0.1", "attn0.qk1.3", "attn0.vo0.0", "attn0.vo1.2"],
                           analysis=analyse(model))
    ins = {i.name: _dims(i) for i in result.model.graph.input}
    assert ins["past_k"] == ins["past_v"] == [BATCH, HEADS, "past", HEAD_DIM - 1]
    assert result.verification.max_abs_diff < 1e-4


def test_cli_scores_with_an_empty_past(tmp_path):
    """``--shape past_k:B,H,0,d``: data-free scoring with a past of length 0 (a prefill)."""
    from onnxprune.cli import main
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(kv_cache_model(), src)
    shapes = [a for n in ("past_k", "past_v")
              for a in ("--shape", f"{n}:{BATCH},{HEADS},0,{HEAD_DIM}")]
    assert main([str(src), str(out), "--ratio", "0.3", "--samples", "4", "--quiet",
                 *shapes]) == 0
    assert out.exists()
