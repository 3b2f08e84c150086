"""More shipped forms from transformers configs (random weights, no hub): GPT-2's Conv1D
(Gemm on a flattened view), Phi-3's fused gate_up projection, Swin's shifted windows. Each
is inspected, cut exactly, and compared with an oracle independent of the gates: the torch
model with the removed units' weights zeroed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from forms import export_model
from hf_forms import OneInOneOut

import onnxprune

SEQ, VOCAB = 16, 100


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=VOCAB,
                     n_positions=32, use_cache=False)
    return OneInOneOut(GPT2Model(cfg), "input_ids", "last_hidden_state")


def _phi3() -> torch.nn.Module:
    from transformers import Phi3Config, Phi3Model

    cfg = Phi3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=48, vocab_size=VOCAB,
                     max_position_embeddings=64, use_cache=False, pad_token_id=0,
                     attn_implementation="eager")
    return OneInOneOut(Phi3Model(cfg), "input_ids", "last_hidden_state")


def _export(build, tmp_path, dynamo: bool):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():       # HF init leaves biases at 0: give them values
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
    x = np.random.default_rng(1).integers(0, VOCAB, (2, SEQ)).astype(np.int64)
    path = str(tmp_path / "m.onnx")
    export_model(model, x, path, dynamo=dynamo, dynamic_batch=False, opset=18)
    return model, x, path


def _zeroed_output(model, x, zero) -> np.ndarray:
    with torch.no_grad():
        for param, index in zero:
            param[index] = 0
        return model(torch.from_numpy(x)).numpy()


def test_gpt2_conv1d_ffn_is_found_and_cut_like_zeroed_weights(tmp_path):
    model, x, path = _export(_gpt2, tmp_path, dynamo=True)
    analysis = onnxprune.inspect(path)
    assert [b.kind for b in analysis.structure.blocks] == ["attention", "ffn"] * 2
    assert [b.channels for b in analysis.structure.ffn] == [64, 64]
    result = onnxprune.cut(path, ["ffn0.ch3", "ffn0.ch40", "ffn1.ch7", "attn1"])
    h = model.model.h
    want = _zeroed_output(model, x, [(h[0].mlp.c_proj.weight, (slice(3, 4),)),
                                     (h[0].mlp.c_proj.weight, (slice(40, 41),)),
                                     (h[1].mlp.c_proj.weight, (slice(7, 8),)),
                                     (h[1].attn.c_proj.weight, (slice(None),)),
                                     (h[1].attn.c_proj.bias, (slice(None),))])
    got = onnxprune.runtime.run(onnxprune.runtime.make_session(result.model), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_phi3_fused_gate_up_is_cut_like_zeroed_weights(tmp_path):
    model, x, path = _export(_phi3, tmp_path, dynamo=True)
    analysis = onnxprune.inspect(path)
    ffn = analysis.structure.ffn
    assert len(ffn) == 2 and all(b.gated and b.channels == 48 for b in ffn)
    result = onnxprune.cut(path, ["ffn0.ch5", "ffn1.ch0", "ffn1.ch47", "attn0.head2"])
    layers = model.model.layers
    want = _zeroed_output(model, x, [
        (layers[0].mlp.down_proj.weight, (slice(None), 5)),
        (layers[1].mlp.down_proj.weight, (slice(None), 0)),
        (layers[1].mlp.down_proj.weight, (slice(None), 47)),
        (layers[0].self_attn.o_proj.weight, (slice(None), slice(16, 24)))])
    got = onnxprune.runtime.run(onnxprune.runtime.make_session(result.model), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [_gpt2, _phi3], ids=["gpt2", "phi3"])
def test_main_job_data_free_on_decoders(tmp_path, build):
    _, _, path = _export(build, tmp_path, dynamo=True)
    pruned, report = onnxprune.prune(path, 0.5, samples=8)
    assert report.removed and report.quality_after.value > 0      # ids mean something
    assert report.data["synthesised"]["x"] == f"token ids in [0, {VOCAB})"
    onnx.checker.check_model(pruned)


def test_swin_prunes_heads_where_shifted_windows_block_module_removal(tmp_path):
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16,
                     depths=[2, 2], num_heads=[2, 4], window_size=4, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = OneInOneOut(SwinForImageClassification(cfg), "pixel_values", "logits").eval()
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    path = str(tmp_path / "swin.onnx")
    export_model(model, x, path, dynamo=False, dynamic_batch=False, opset=18)
    analysis = onnxprune.inspect(path)
    assert len(analysis.structure.attention) == 4 and len(analysis.structure.ffn) == 4
    assert not all(b.removable for b in analysis.structure.attention)
    _, report = onnxprune.prune(path, 0.4, samples=4, method="stat")
    excluded = report.to_json()["excluded"]
    assert excluded and all("several users" in e["reason"] for e in excluded)
    assert any(".head" in u for u in report.removed)


class _TimesFm(torch.nn.Module):
    """TimesFM's point forecast from a context window (frequency 0)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import TimesFmConfig, TimesFmModelForPrediction

        cfg = TimesFmConfig(patch_length=8, context_length=64, horizon_length=8,
                            hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, head_dim=8)
        self.m = TimesFmModelForPrediction(cfg)

    def forward(self, x):
        freq = torch.zeros(x.shape[0], 1, dtype=torch.long)
        return self.m(past_values=x, freq=freq).mean_predictions


def test_timesfm_main_job_excludes_non_residual_ffns_and_prunes_the_rest(tmp_path):
    """TimesFM (dynamo export): its input and output residual MLPs have no residual add
    around the FFN (named, left out); the decoder layers prune; the gradient scores
    differentiate through the patching."""
    torch.manual_seed(0)
    model = _TimesFm().eval()
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    path = str(tmp_path / "timesfm.onnx")
    export_model(model, x, path, dynamo=True, dynamic_batch=False, opset=18)
    structure = onnxprune.inspect(path).structure
    assert len(structure.attention) == 2 and len(structure.ffn) == 4
    assert [b.heads for b in structure.attention] == [4, 4]
    _, report = onnxprune.prune(path, 0.5, samples=8, seed=0)
    excluded = {(e["block"], e["kind"]) for e in report.to_json()["excluded"]}
    assert ("ffn1", "FFN modules") in excluded
    assert any(".head" in u or ".ch" in u for u in report.removed)
    result = onnxprune.cut(path, ["attn0.head1", "ffn1.ch3", "attn1"])
    assert result.verification.max_abs_diff < 1e-4
