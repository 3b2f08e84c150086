"""CLIP text and vision encoders after ``onnxruntime.transformers.optimizer`` with
``model_type="clip"`` (opt levels 1 and 2, fp32 and float16): SkipLayerNormalization
residuals and QuickGelu. Inspect finds every block; a mixed cut of heads, QK and VO channels
and FFN channels matches the torch model with those weights zeroed (an oracle independent of
the gates); whole modules cut exactly; the data-free main job runs on every form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")

import onnxprune  # noqa: E402
from onnxprune.runtime import make_session, run  # noqa: E402

D, HEADS, FF, LAYERS, SEQ, IMAGE, PATCH = 32, 4, 64, 2, 8, 32, 8
DH = D // HEADS
UNITS = ["attn0.head1", "attn1.qk0.2", "attn1.qk1.5", "attn1.qk2.0", "attn1.qk3.7",
         "attn1.vo0.3", "attn1.vo1.1", "attn1.vo2.3", "attn1.vo3.6", "ffn0.ch3", "ffn1.ch40"]
VO_COLUMNS = [0 * DH + 3, 1 * DH + 1, 2 * DH + 3, 3 * DH + 6]


class Encoder(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        common = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS)
        if kind == "text":
            self.m = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                **common))
        else:
            self.m = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
                image_size=IMAGE, patch_size=PATCH, **common))
        self.kind = kind

    def forward(self, x):
        if self.kind == "text":
            return self.m(input_ids=x).last_hidden_state
        return self.m(pixel_values=x).last_hidden_state


def _encoder(kind: str) -> Encoder:
    torch.manual_seed(0)
    model = Encoder(kind).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():   # HF init leaves biases 0: randomise them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _input(kind: str, batch: int = 2, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "text":
        return rng.integers(0, 100, (batch, SEQ), dtype=np.int64)
    return rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)


def _name(kind: str) -> str:
    return "input_ids" if kind == "text" else "pixel_values"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per encoder: the torch model and its optimizer outputs (level 1, 2, 2 in fp16)."""
    tmp = tmp_path_factory.mktemp("clip_optimized")
    out = {}
    for kind in ("text", "vision"):
        model = _encoder(kind)
        raw = str(tmp / f"clip_{kind}.onnx")
        torch.onnx.export(model, (torch.from_numpy(_input(kind)),), raw,
                          input_names=[_name(kind)], output_names=["y"], opset_version=17,
                          dynamo=False, dynamic_axes={_name(kind): {0: "batch"}})
        paths = {}
        for level in (1, 2):
            opt = optimizer.optimize_model(raw, model_type="clip", num_heads=HEADS,
                                           hidden_size=D, opt_level=level, use_gpu=False)
            paths[level] = str(tmp / f"clip_{kind}_o{level}.onnx")
            opt.save_model_to_file(paths[level])
        opt.convert_float_to_float16(keep_io_types=True)
        paths["fp16"] = str(tmp / f"clip_{kind}_fp16.onnx")
        opt.save_model_to_file(paths["fp16"])
        out[kind] = (model, paths)
    return out


def _zeroed_torch(model: Encoder, x: np.ndarray) -> np.ndarray:
    """The torch model with the weights of ``UNITS`` zeroed: head 1's output-projection
    columns in layer 0, the QK channels' query rows (and biases) and the VO channels'
    output-projection columns in layer 1, the FFN channels' fc2 columns."""
    layers = model.m.encoder.layers
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        layers[0].self_attn.out_proj.weight[:, DH:2 * DH] = 0
        rows = [0 * DH + 2, 1 * DH + 5, 2 * DH + 0, 3 * DH + 7]
        layers[1].self_attn.q_proj.weight[rows] = 0
        layers[1].self_attn.q_proj.bias[rows] = 0
        layers[1].self_attn.out_proj.weight[:, VO_COLUMNS] = 0
        layers[0].mlp.fc2.weight[:, 3] = 0
        layers[1].mlp.fc2.weight[:, 40] = 0
        out = model(torch.from_numpy(x)).numpy()
    model.load_state_dict(state)
    return out


@pytest.mark.parametrize("kind", ["text", "vision"])
@pytest.mark.parametrize("form", [1, 2, "fp16"])
def test_inspect_counts(exported, kind, form):
    _, paths = exported[kind]
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(paths[form]).graph.node}
    structure = onnxprune.inspect(paths[form]).structure
    assert [b.name for b in structure.blocks] == ["attn0", "ffn0", "attn1", "ffn1"]
    for block in structure.attention:
        assert (block.heads, block.qk_dim, block.vo_dim, block.removable) == \
            (HEADS, DH, DH, True)
    assert [b.channels for b in structure.ffn] == [FF, FF]


@pytest.mark.parametrize("kind", ["text", "vision"])
@pytest.mark.parametrize("form", [1, 2, "fp16"])
def test_mixed_cut_matches_the_zeroed_torch_model(exported, kind, form):
    model, paths = exported[kind]
    result = onnxprune.cut(paths[form], UNITS)
    x = _input(kind, batch=3, seed=7)
    got = run(make_session(result.model), {_name(kind): x})["y"].astype(np.float32)
    want = _zeroed_torch(model, x)
    tolerance = 2e-2 if form == "fp16" else 1e-4
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_whole_modules_and_main_job(exported, kind):
    _, paths = exported[kind]
    result = onnxprune.cut(paths[2], ["attn1", "ffn0"])
    assert result.verification.max_abs_diff < 1e-4
    for form in (2, "fp16"):
        pruned, report = onnxprune.prune(paths[form], 0.5, samples=8, seed=0)
        assert report.removed
        y = run(make_session(pruned), {_name(kind): _input(kind)})["y"]
        assert np.isfinite(y).all()
        assert report.params_after <= 0.55 * report.params_before + \
            (report.params_before - sum(b.params for b in onnxprune.inspect(
                paths[form]).structure.blocks))


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_main_job_with_a_calibration_file(exported, kind, tmp_path):
    from onnxprune.cli import main
    _, paths = exported[kind]
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{_name(kind): _input(kind, batch=16, seed=9)})
    out = tmp_path / "pruned.onnx"
    assert main([paths["fp16"], str(out), "--ratio", "0.5", "--calib", str(calib),
                 "--quiet"]) == 0
    x = _input(kind, batch=2, seed=10)
    assert np.isfinite(run(make_session(onnx.load(out)), {_name(kind): x})["y"]).all()
