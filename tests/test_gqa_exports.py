"""Grouped-query attention in Hugging Face Llama, Qwen2 and Gemma exports (issue 13): discovery of
the KV groups, exact cuts of a KV group (``attn{i}.kv{g}``) and of query heads inside their
groups, through rotary embeddings, with both torch exporters, against the torch model with
the removed heads' output-projection input columns zeroed (an oracle independent of the
gates); and the main job, data-free.

Models come from configs (2 layers, hidden 64, 4 query heads, 2 KV heads, eager attention,
no cache), random weights, no hub access.
"""

from __future__ import annotations

import contextlib
import copy
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
from onnxprune.errors import OnnxpruneError
from onnxprune.report import structure_json

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, SEQ = 64, 4, 2, 16, 8
SHAPES = {"x": (1, SEQ, HIDDEN)}


class Wrapped(nn.Module):
    """x: [B, T, hidden] embeddings -> last hidden state; the all-ones mask keeps the
    TorchScript exporter off the packed-sequence check (aten::diff)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[:2], dtype=torch.long)
        return self.model(inputs_embeds=x, attention_mask=mask).last_hidden_state


def build(name: str) -> nn.Module:
    from transformers import (
        GemmaConfig,
        GemmaModel,
        LlamaConfig,
        LlamaModel,
        Qwen2Config,
        Qwen2Model,
    )

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaModel),
                             "qwen2": (Qwen2Config, Qwen2Model),
                             "gemma": (GemmaConfig, GemmaModel)}[name]
    cfg = config_cls(vocab_size=50, hidden_size=HIDDEN, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=HEADS,
                     num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                     max_position_embeddings=64, use_cache=False,
                     attn_implementation="eager")
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():   # weights large enough that every head matters in the output
        for name, p in model.named_parameters():
            if p.ndim == 2 or name.endswith("bias"):
                p.normal_(0.0, 0.15)
    return Wrapped(model).eval()


def export(model: nn.Module, path: str, dynamo: bool) -> onnx.ModelProto:
    x = torch.randn(2, SEQ, HIDDEN)
    kwargs = {"input_names": ["x"], "output_names": ["y"], "dynamo": dynamo,
              "opset_version": 18}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("b", max=64),
                                     1: torch.export.Dim("t", max=64)},)
        kwargs["external_data"] = False
    else:
        kwargs["dynamic_axes"] = {"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, **kwargs)
    return onnx.load(path)


def zeroed_heads(model: nn.Module, heads: dict[int, list[int]]) -> nn.Module:
    """The torch model with the o_proj input columns of the given query heads zeroed."""
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for layer, hs in heads.items():
            weight = oracle.model.layers[layer].self_attn.o_proj.weight
            for h in hs:
                weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
    return oracle


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True),
         ("gemma", False), ("gemma", True)]     # Gemma: gated tanh-GELU, (1 + w) RMSNorm


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    cache: dict = {}

    def get(name: str, dynamo: bool):
        if (name, dynamo) not in cache:
            model = build(name)
            path = str(tmp_path_factory.mktemp("gqa") / f"{name}_{dynamo}.onnx")
            cache[name, dynamo] = (model, export(model, path, dynamo), path)
        return cache[name, dynamo]

    return get


def ids(case):
    return f"{case[0]}-{'dynamo' if case[1] else 'script'}"


@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
def test_inspect_finds_the_groups(exports, case):
    _, model, _ = exports(*case)
    analysis = onnxprune.inspect(model, shapes=SHAPES)
    blocks = [b for b in structure_json(analysis)["blocks"] if b["kind"] == "attention"]
    assert len(blocks) == 2
    for entry in blocks:
        assert entry["prunable"] and entry["removable"]
        assert entry["heads"] == HEADS and entry["kv_heads"] == KV_HEADS
        assert entry["kv_groups"] == [0, 0, 1, 1]


@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
@pytest.mark.parametrize(("units", "heads"), [
    (["attn0.kv1", "attn1.kv0"], {0: [2, 3], 1: [0, 1]}),
    (["attn0.head0", "attn0.head3", "attn1.head1", "attn1.head2"], {0: [0, 3], 1: [1, 2]}),
    (["attn0.kv0", "attn0.head2"], {0: [0, 1, 2]}),
], ids=["kv-groups", "head-per-group", "group-and-head"])
def test_cut_equals_zeroed_torch_model(exports, tmp_path, case, units, heads):
    torch_model, model, _ = exports(*case)
    result = onnxprune.cut(model, units, shapes=SHAPES)
    assert result.verification is not None
    oracle = export(zeroed_heads(torch_model, heads), str(tmp_path / "oracle.onnx"), case[1])
    x = np.random.default_rng(7).standard_normal((3, 5, HIDDEN)).astype(np.float32)
    got, want, original = run(result.model, x), run(oracle, x), run(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(original - want).max() > 1e-3          # the heads did matter
    removed = sum(len(h) for h in heads.values())
    per_head = 2 * HIDDEN * HEAD_DIM                   # Q columns and o_proj rows
    kv = 2 * HIDDEN * HEAD_DIM * sum(1 for u in units if ".kv" in u)
    biases = (HEAD_DIM * removed + 2 * HEAD_DIM * sum(1 for u in units if ".kv" in u)
              if case[0] == "qwen2" else 0)           # Qwen2's q/k/v biases
    assert float_weights(model) - float_weights(result.model) == removed * per_head + kv + biases


def float_weights(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)


def test_unequal_heads_per_group_are_refused(exports):
    _, model, _ = exports("llama", False)
    with pytest.raises(OnnxpruneError, match="same number of query heads from every kept KV"):
        onnxprune.cut(model, ["attn0.head0"], shapes=SHAPES)


@pytest.mark.parametrize("dynamo", [False, True], ids=["script", "dynamo"])
def test_main_job_data_free(exports, dynamo):
    _, model, _ = exports("llama", dynamo)
    _, report = onnxprune.prune(model, ratio=0.3, shapes=SHAPES, samples=8)
    assert report.params_after < report.params_before
    # --granularity head plans the query heads of a GQA layer in whole groups
    _, by_head = onnxprune.prune(model, ratio=0.15, granularity="head", shapes=SHAPES,
                                 samples=8)
    heads = {name for name in by_head.removed}
    assert heads and all(".head" in name for name in heads)
    for layer in ("attn0", "attn1"):
        removed = {int(n.rsplit("head", 1)[1]) for n in heads if n.startswith(layer)}
        assert removed in (set(), {0, 1}, {2, 3})


def test_main_job_with_a_calibration_file(exports, tmp_path):
    """The CLI's main job on a small .npz calibration set (inputs only: self-distillation)
    cuts the grouped layers through the gradient scores."""
    from onnxprune.cli import main
    _, _, path = exports("llama", True)
    calib = tmp_path / "calib.npz"
    x = np.random.default_rng(3).standard_normal((16, SEQ, HIDDEN)).astype(np.float32)
    np.savez(calib, x=x)
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    assert main([path, str(out), "--ratio", "0.5", "--calib", str(calib), "--report",
                 str(report), "--quiet"]) == 0
    data = json.loads(report.read_text())
    assert not data["data"]["data_free"] and data["data"]["samples"] == 16
    assert data["params"]["after"] < data["params"]["before"]
