"""BERT after ``onnxruntime.transformers.optimizer`` (opt levels 1 and 2): fused com.microsoft
Attention (packed QKV), SkipLayerNormalization residuals and BiasGelu. Inspect finds every
block, cuts of heads, VO and FFN channels and whole modules keep the fused ops and are exact,
also against an oracle independent of the gates (the torch model with the removed heads'
output-projection rows / FFN down rows zeroed), and the data-free main job runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")

from onnxruntime.transformers.fusion_options import FusionOptions  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.runtime import make_session, run  # noqa: E402

D, HEADS, FF, LAYERS, SEQ = 32, 4, 64, 2, 8
SHAPES = {"input_ids": (2, SEQ), "attention_mask": (2, SEQ)}


class Bert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, intermediate_size=FF,
                                      max_position_embeddings=64, attn_implementation="eager")
        self.m = transformers.BertModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _bert() -> Bert:
    torch.manual_seed(0)
    model = Bert().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():   # HF init leaves biases 0 and LayerNorm 1: randomise them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.mul_(5.0)  # larger weights: attention that is not uniform
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The torch model and its optimizer outputs at opt levels 1 and 2."""
    tmp = tmp_path_factory.mktemp("ort_optimized")
    model = _bert()
    ids = torch.randint(0, 100, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    raw = str(tmp / "bert.onnx")
    axes = {"batch": 0, "seq": 1}
    dyn = {n: {i: a for a, i in axes.items()} for n in ("input_ids", "attention_mask")}
    dyn["y"] = {0: "batch", 1: "seq"}
    torch.onnx.export(model, (ids, mask), raw, input_names=["input_ids", "attention_mask"],
                      output_names=["y"], opset_version=17, dynamo=False, dynamic_axes=dyn)
    paths = {}
    for level in (1, 2):
        opt = optimizer.optimize_model(raw, model_type="bert", num_heads=HEADS, hidden_size=D,
                                       opt_level=level, use_gpu=False)
        paths[level] = str(tmp / f"bert_o{level}.onnx")
        opt.save_model_to_file(paths[level])
        options = FusionOptions("bert")
        options.use_multi_head_attention = True   # separate Q/K/V MatMuls, packed bias
        opt = optimizer.optimize_model(raw, model_type="bert", num_heads=HEADS, hidden_size=D,
                                       opt_level=level, use_gpu=False,
                                       optimization_options=options)
        paths[f"mha{level}"] = str(tmp / f"bert_mha_o{level}.onnx")
        opt.save_model_to_file(paths[f"mha{level}"])
    return model, paths


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.domain == "com.microsoft"]


def _feeds(batch: int = 3, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, SEQ), np.int64)
    mask[0, -3:] = 0   # one padded row: the mask input is used
    return {"input_ids": rng.integers(0, 100, (batch, SEQ), dtype=np.int64),
            "attention_mask": mask}


def _zeroed_torch(model: Bert, heads: dict[int, list[int]], channels: dict[int, list[int]],
                  modules: list[int], feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The oracle: the torch model with removed heads' W_o rows, FFN down rows and whole
    attention output projections (weights only: the gate leaves the bias) zeroed."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dh = D // HEADS
    with torch.no_grad():
        for layer in range(LAYERS):
            attn = model.m.encoder.layer[layer].attention.output.dense.weight
            for h in heads.get(layer, []):
                attn[:, h * dh:(h + 1) * dh] = 0
            if layer in modules:
                attn.zero_()
            down = model.m.encoder.layer[layer].output.dense.weight
            down[:, channels.get(layer, [])] = 0
        out = model(torch.from_numpy(feeds["input_ids"]),
                    torch.from_numpy(feeds["attention_mask"])).numpy()
    model.load_state_dict(state)
    return out


@pytest.mark.parametrize("level", [1, 2])
def test_inspect_finds_every_fused_block(exported, level):
    _, paths = exported
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= set(
        _ops(onnx.load(paths[level])))
    analysis = onnxprune.inspect(paths[level], SHAPES)
    blocks = analysis.structure.blocks
    assert [b.name for b in blocks] == ["attn0", "ffn0", "attn1", "ffn1"]
    for block in analysis.structure.attention:
        assert (block.heads, block.qk_dim, block.vo_dim) == (HEADS, D // HEADS, D // HEADS)
        assert block.removable and block.prunable
        # packed projection 2·B·S·D·3D, scores and mix 2·B·S²·(D + D), output projection
        assert block.flops == 2 * 2 * SEQ * D * 3 * D + 2 * 2 * SEQ * SEQ * 2 * D \
            + 2 * 2 * SEQ * D * D
        assert block.params == D * 3 * D + 3 * D + D * D + D
    for block in analysis.structure.ffn:
        assert (block.channels, block.activation, block.removable) == (FF, "gelu", True)
        assert block.flops == 2 * 2 * 2 * SEQ * D * FF
    assert analysis.structure.flops == sum(b.flops for b in blocks)


@pytest.mark.parametrize("level", [1, 2])
def test_cut_keeps_the_fused_ops_and_matches_the_zeroed_torch_model(exported, level):
    model, paths = exported
    units = ["attn0.head1", "attn0.head2", "attn1.head0", "ffn0.ch3", "ffn0.ch17",
             "ffn1.ch0", "ffn1.ch63", "attn1.vo1.2", "attn1.vo2.2", "attn1.vo3.5"]
    result = onnxprune.cut(paths[level], units, SHAPES)
    ops = _ops(result.model)
    assert ops.count("Attention") == 2 and ops.count("SkipLayerNormalization") == 4
    assert ops.count("BiasGelu") == 2
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in result.model.graph.node if n.op_type == "Attention"]
    assert [a["num_heads"] for a in attrs] == [2, 3]
    assert attrs[1]["qkv_hidden_sizes"] == [24, 24, 21]
    feeds = _feeds()
    got = run(make_session(result.model), feeds)["y"]
    # VO channel c of head h is W_o row h·dh + c
    vo_rows = [8 + 2, 16 + 2, 24 + 5]
    with torch.no_grad():
        w = model.m.encoder.layer[1].attention.output.dense.weight
        saved = w.clone()
        w[:, vo_rows] = 0
        want = _zeroed_torch(model, {0: [1, 2], 1: [0]}, {0: [3, 17], 1: [0, 63]}, [], feeds)
        w.copy_(saved)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("level", [1, 2])
def test_module_removal_through_skip_layernorm(exported, level):
    model, paths = exported
    result = onnxprune.cut(paths[level], ["attn1", "ffn0"], SHAPES)
    ops = _ops(result.model)
    assert ops.count("Attention") == 1 and ops.count("SkipLayerNormalization") == 4
    feeds = _feeds()
    got = run(make_session(result.model), feeds)["y"]
    want = _zeroed_torch(model, {}, {0: list(range(FF))}, [1], feeds)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("level", [1, 2])
def test_qk_channel_cut_inside_the_packed_op_matches_the_zeroed_torch_model(exported, level):
    """QK channels of a packed com.microsoft Attention: the op's qkv_hidden_sizes shrink
    for Q and K, and the oracle is the torch model with those query rows (and biases)
    zeroed, which removes the same q·k terms."""
    model, paths = exported
    dh = D // HEADS
    channels = [(0, 1), (1, 3), (2, 0), (3, 5)]          # one per head: equal widths
    result = onnxprune.cut(paths[level], [f"attn0.qk{h}.{c}" for h, c in channels], SHAPES)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in result.model.graph.node if n.op_type == "Attention"]
    assert attrs[0]["qkv_hidden_sizes"] == [D - HEADS, D - HEADS, D]
    assert attrs[0]["scale"] == pytest.approx(dh ** -0.5)
    feeds = _feeds()
    got = run(make_session(result.model), feeds)["y"]
    rows = [h * dh + c for h, c in channels]
    query = model.m.encoder.layer[0].attention.self.query
    with torch.no_grad():
        saved = query.weight.clone(), query.bias.clone()
        query.weight[rows] = 0
        query.bias[rows] = 0
        want = _zeroed_torch(model, {}, {}, [], feeds)
        query.weight.copy_(saved[0])
        query.bias.copy_(saved[1])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("level", [1, 2])
def test_data_free_prune_to_half(exported, level, tmp_path):
    _, paths = exported
    pruned, _ = onnxprune.prune(paths[level], 0.5, shapes=SHAPES)
    assert _ops(pruned).count("SkipLayerNormalization") == 4
    assert "Attention" in _ops(pruned) or "BiasGelu" in _ops(pruned)
    feeds = _feeds()
    assert run(make_session(pruned), feeds)["y"].shape == (3, SEQ, D)


class Gpt2(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                      n_positions=64, attn_implementation="eager")
        self.m = transformers.GPT2Model(cfg)

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state


@pytest.fixture(scope="module")
def pre_ln(tmp_path_factory):
    """GPT-2 and ViT optimizer outputs (pre-LayerNorm: SkipLayerNormalization's output 3, the
    residual sum, feeds the next block's residual; attention stays decomposed here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_forms import export_hf

    tmp = tmp_path_factory.mktemp("ort_pre_ln")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, SEQ))
    gpt2 = str(tmp / "gpt2.onnx")
    dyn = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")}
    torch.onnx.export(Gpt2().eval(), (ids, torch.ones(2, SEQ, dtype=torch.int64)), gpt2,
                      input_names=["input_ids", "attention_mask"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes=dyn)
    vit = str(tmp / "vit.onnx")
    export_hf("vit_eager", vit, dynamo=False, perturbed=True, opset=17)
    out = {}
    for name, path, shapes in (("gpt2", gpt2, SHAPES), ("vit", vit, {"x": (2, 3, 16, 16)})):
        for level in (1, 2):
            opt = optimizer.optimize_model(path, model_type=name, num_heads=HEADS,
                                           hidden_size=D, opt_level=level, use_gpu=False)
            out[(name, level)] = (str(tmp / f"{name}_o{level}.onnx"), shapes)
            opt.save_model_to_file(out[(name, level)][0])
    return out


@pytest.mark.parametrize("name", ["gpt2", "vit"])
@pytest.mark.parametrize("level", [1, 2])
def test_pre_ln_optimizer_outputs_inspect_and_cut(pre_ln, name, level):
    path, shapes = pre_ln[(name, level)]
    assert "SkipLayerNormalization" in _ops(onnx.load(path))
    analysis = onnxprune.inspect(path, shapes)
    blocks = analysis.structure.blocks
    assert [b.name for b in blocks] == ["attn0", "ffn0", "attn1", "ffn1"]
    assert all(b.removable and b.prunable and b.flops > 0 for b in blocks)
    assert [b.heads for b in analysis.structure.attention] == [HEADS, HEADS]
    for units in (["attn0.head1", "attn1.head0", "ffn0.ch3", "ffn1.ch5"], ["attn1", "ffn0"]):
        result = onnxprune.cut(path, units, shapes, analysis=analysis)
        assert _ops(result.model).count("SkipLayerNormalization") == 4


@pytest.mark.parametrize("level", [1, 2])
def test_multi_head_attention_output(exported, level, tmp_path):
    """``use_multi_head_attention``: com.microsoft.MultiHeadAttention between separate Q/K/V
    MatMuls (the Q|K|V bias packed into the op): inspect, an exact cut against the zeroed
    torch model, and the data-free main job."""
    model, paths = exported
    path = paths[f"mha{level}"]
    assert _ops(onnx.load(path)).count("MultiHeadAttention") == 2
    analysis = onnxprune.inspect(path, SHAPES)
    assert [(b.name, getattr(b, "heads", 0)) for b in analysis.structure.blocks] == [
        ("attn0", HEADS), ("ffn0", 0), ("attn1", HEADS), ("ffn1", 0)]
    assert all(b.flops > 0 and b.removable for b in analysis.structure.blocks)
    result = onnxprune.cut(path, ["attn0.head3", "attn1.head1", "ffn1.ch9", "ffn0"], SHAPES,
                           analysis=analysis)
    assert _ops(result.model).count("MultiHeadAttention") == 2
    feeds = _feeds()
    got = run(make_session(result.model), feeds)["y"]
    want = _zeroed_torch(model, {0: [3], 1: [1]}, {0: list(range(FF)), 1: [9]}, [], feeds)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    pruned, _ = onnxprune.prune(path, 0.5, shapes=SHAPES)
    assert _ops(pruned).count("SkipLayerNormalization") == 4


def test_main_job_with_a_calibration_file(exported, tmp_path):
    from onnxprune.cli import main
    _, paths = exported
    rng = np.random.default_rng(4)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=rng.integers(0, 100, (16, SEQ)).astype(np.int64),
             attention_mask=np.ones((16, SEQ), np.int64))
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    assert main([paths[2], str(out), "--ratio", "0.5", "--calib", str(calib), "--report",
                 str(report), "--quiet"]) == 0
    data = json.loads(report.read_text())
    assert not data["data"]["data_free"] and data["data"]["samples"] == 16
    assert _ops(onnx.load(out)).count("SkipLayerNormalization") == 4
