"""Key/value-cache decoders (issue 13, item 4): a tiny GPT-2 (2 layers, hidden 32, 4 heads)
exported with its cache as graph inputs ``past_key_i``/``past_value_i`` [B, H, P, d] and
outputs ``present_key_i``/``present_value_i``, with both torch exporters. Discovery finds
every attention block with its cache; a head cut shrinks the cache inputs and outputs and
is exact, against onnxprune's own verification and against the torch model with the
removed heads' output-projection rows zeroed (fed the same past); the main job runs
data-free on a short past and reports the new cache shapes.

The model comes from a config, random weights, no hub access.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import onnxprune
from onnxprune.report import structure_json

LAYERS, HEADS, HEAD_DIM, HIDDEN, VOCAB = 2, 4, 8, 32, 50
PAST, SEQ = 2, 3
NAMES = [f"past_{kv}_{i}" for i in range(LAYERS) for kv in ("key", "value")]
PRESENT = [n.replace("past", "present") for n in NAMES]
SHAPES = {"input_ids": (1, SEQ), **{n: (1, HEADS, PAST, HEAD_DIM) for n in NAMES}}


class WithCache(nn.Module):
    """input_ids plus the per-layer past keys/values -> logits and the present cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(LAYERS):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        layers = out.past_key_values.layers
        return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])


def build() -> WithCache:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     n_positions=64, use_cache=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():   # weights large enough that every head matters in the output
        for name, p in model.named_parameters():
            if p.ndim == 2 or name.endswith("bias"):
                p.normal_(0.0, 0.15)
    return WithCache(model).eval()


def export(model: nn.Module, path: str, dynamo: bool) -> onnx.ModelProto:
    ids = torch.randint(0, VOCAB, (1, SEQ))
    past = tuple(torch.randn(1, HEADS, PAST, HEAD_DIM) for _ in NAMES)
    kwargs = {"input_names": ["input_ids", *NAMES], "output_names": ["logits", *PRESENT],
              "dynamo": dynamo, "opset_version": 18}
    if dynamo:
        t, p = torch.export.Dim("t", max=32), torch.export.Dim("p", max=32)
        kwargs["dynamic_shapes"] = ({1: t}, tuple({2: p} for _ in NAMES))
        kwargs["external_data"] = False
    else:
        kwargs["dynamic_axes"] = {"input_ids": {1: "t"}, "logits": {1: "t"},
                                  **{n: {2: "p"} for n in NAMES},
                                  **{n: {2: "total"} for n in PRESENT}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, *past), path, **kwargs)
    return onnx.load(path)


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def exported(request, tmp_path_factory):
    model = build()
    path = str(tmp_path_factory.mktemp("kv") / "gpt2_cache.onnx")
    return model, export(model, path, request.param), path


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _feeds(seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64),
            **{n: rng.standard_normal((1, HEADS, PAST, HEAD_DIM)).astype(np.float32)
               for n in NAMES}}


def test_inspect_finds_every_attention_block_with_its_cache(exported):
    _, _, path = exported
    info = structure_json(onnxprune.inspect(path, shapes=SHAPES))
    attention = [b for b in info["blocks"] if b["kind"] == "attention"]
    assert len(attention) == LAYERS
    assert len([b for b in info["blocks"] if b["kind"] == "ffn"]) == LAYERS
    for i, block in enumerate(attention):
        assert block["prunable"], block
        assert block["heads"] == HEADS
        assert block["cache"] == {"past": [f"past_key_{i}", f"past_value_{i}"],
                                  "present": [f"present_key_{i}", f"present_value_{i}"]}


def test_head_cut_shrinks_the_cache_and_matches_torch(exported):
    _, _, path = exported
    removed = {0: [1], 1: [0, 3]}
    units = [f"attn{i}.head{h}" for i, heads in removed.items() for h in heads]
    result = onnxprune.cut(path, units, shapes=SHAPES)
    assert result.verification.max_abs_diff < 1e-4
    graph = result.model.graph
    ins, outs = {i.name: i for i in graph.input}, {o.name: o for o in graph.output}
    for i, heads in removed.items():
        for kv in ("key", "value"):
            assert _dims(ins[f"past_{kv}_{i}"])[1] == HEADS - len(heads)
            assert _dims(outs[f"present_{kv}_{i}"])[1] == HEADS - len(heads)
    # the oracle: the torch model with the removed heads' c_proj rows zeroed, same past
    oracle = build()
    with torch.no_grad():
        for i, heads in removed.items():
            weight = oracle.model.transformer.h[i].attn.c_proj.weight   # Conv1D: [in, out]
            for h in heads:
                weight[h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
    feeds = _feeds()
    with torch.no_grad():
        want = [t.numpy() for t in oracle(torch.from_numpy(feeds["input_ids"]),
                                          *[torch.from_numpy(feeds[n]) for n in NAMES])]
    kept = {n: [h for h in range(HEADS) if h not in removed[int(n[-1])]] for n in NAMES}
    cut_feeds = {**feeds, **{n: feeds[n][:, kept[n]] for n in NAMES}}
    session = ort.InferenceSession(result.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in graph.output], session.run(None, cut_feeds)))
    np.testing.assert_allclose(got["logits"], want[0], rtol=1e-4, atol=1e-4)
    for name, ref in zip(PRESENT, want[1:]):
        assert got[name].shape == (1, len(kept[name.replace("present", "past")]),
                                   PAST + SEQ, HEAD_DIM)
        np.testing.assert_allclose(got[name], ref[:, kept[name.replace("present", "past")]],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("past", [2, 0])
def test_main_job_data_free_cuts_heads_and_shrinks_the_caches(exported, past):
    _, _, path = exported
    shapes = {**SHAPES, **{n: (1, HEADS, past, HEAD_DIM) for n in NAMES}}
    model, report = onnxprune.prune(path, ratio=0.2, method="taylor", seed=0,
                                    granularity="head", shapes=shapes)
    removed = [u.split(":")[-1] for u in report.removed]
    assert removed and all(".head" in u for u in removed)
    data = report.to_json()
    assert data["data"]["data_free"]
    declared = {v.name: _dims(v) for v in [*model.graph.input, *model.graph.output]}
    assert set(data["cache_shapes"]) == set(NAMES) | set(PRESENT)
    for name, shape in data["cache_shapes"].items():
        assert shape == declared[name]
    assert any(shape[1] < HEADS for shape in data["cache_shapes"].values())


def test_main_job_data_free_cuts_ffn_channels(exported):
    _, _, path = exported
    _, report = onnxprune.prune(path, ratio=0.3, method="taylor", seed=0, shapes=SHAPES,
                                granularity="ffn")
    assert report.removed and all(".ch" in u for u in report.removed)


def test_progressive_steps_feed_each_step_its_cut_cache(exported):
    _, _, path = exported
    model, report = onnxprune.prune(path, ratio=0.3, method="taylor", steps=2, seed=0,
                                    shapes=SHAPES)
    declared = {v.name: _dims(v) for v in [*model.graph.input, *model.graph.output]}
    assert report.cache_shapes == {n: declared[n] for n in [*NAMES, *PRESENT]}
    assert all(s.max_abs_diff < 1e-4 for s in report.steps)


# -- Llama, grouped-query attention (4 query heads, 2 KV heads) with its cache -------------
KV_HEADS, LLAMA_DIM, LLAMA_HIDDEN = 2, 16, 64
LLAMA_SHAPES = {"input_ids": (1, SEQ), **{n: (1, KV_HEADS, PAST, LLAMA_DIM) for n in NAMES}}


def build_llama() -> WithCache:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=LLAMA_HIDDEN, intermediate_size=128,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      use_cache=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    return WithCache(model).eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_llama_kv_group_cut_shrinks_the_cache_and_matches_torch(tmp_path, dynamo):
    path = str(tmp_path / "llama_cache.onnx")
    ids = torch.randint(0, VOCAB, (1, SEQ))
    past = tuple(torch.randn(1, KV_HEADS, PAST, LLAMA_DIM) for _ in NAMES)
    kwargs = {"input_names": ["input_ids", *NAMES], "output_names": ["logits", *PRESENT],
              "dynamo": dynamo, "opset_version": 18}
    if dynamo:
        t, p = torch.export.Dim("t", max=32), torch.export.Dim("p", max=32)
        kwargs["dynamic_shapes"] = ({1: t}, tuple({2: p} for _ in NAMES))
        kwargs["external_data"] = False
    else:
        kwargs["dynamic_axes"] = {"input_ids": {1: "t"}, **{n: {2: "p"} for n in NAMES}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(build_llama(), (ids, *past), path, **kwargs)
    info = structure_json(onnxprune.inspect(path, shapes=LLAMA_SHAPES))
    attention = [b for b in info["blocks"] if b["kind"] == "attention"]
    assert [b["heads"] for b in attention] == [HEADS] * LAYERS
    assert all(b.get("cache") for b in attention)
    result = onnxprune.cut(path, ["attn0.kv1"], shapes=LLAMA_SHAPES)
    ins = {i.name: _dims(i) for i in result.model.graph.input}
    assert ins["past_key_0"][1] == ins["past_value_0"][1] == KV_HEADS - 1
    assert ins["past_key_1"][1] == KV_HEADS
    oracle = build_llama()
    with torch.no_grad():   # query heads 2 and 3 read KV group 1
        oracle.model.model.layers[0].self_attn.o_proj.weight[:, 2 * LLAMA_DIM:] = 0
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64),
             **{n: rng.standard_normal((1, KV_HEADS, PAST, LLAMA_DIM)).astype(np.float32)
                for n in NAMES}}
    with torch.no_grad():
        want = oracle(torch.from_numpy(feeds["input_ids"]),
                      *[torch.from_numpy(feeds[n]) for n in NAMES])[0].numpy()
    cut_feeds = {**feeds, "past_key_0": feeds["past_key_0"][:, :1],
                 "past_value_0": feeds["past_value_0"][:, :1]}
    session = ort.InferenceSession(result.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["logits"], cut_feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_main_job_with_a_calibration_file(exported, tmp_path):
    """The main job on an .npz of token ids and past caches (one sequence each)."""
    from onnxprune.cli import main
    _, _, path = exported
    rng = np.random.default_rng(4)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=rng.integers(0, VOCAB, (8, SEQ)).astype(np.int64),
             **{n: rng.standard_normal((8, HEADS, PAST, HEAD_DIM)).astype(np.float32)
                for n in NAMES})
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    assert main([path, str(out), "--ratio", "0.5", "--calib", str(calib), "--batch-size", "1",
                 "--report", str(report), "--quiet"]) == 0
    data = json.loads(report.read_text())
    assert not data["data"]["data_free"]
    assert any(shape[1] < HEADS for shape in data["cache_shapes"].values())
