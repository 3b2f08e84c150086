"""Small randomly initialised Hugging Face transformers models, built from configs only.

No hub access: every model comes from its config class with 2 layers and hidden size 32, a
fixed seed, eval mode.  Each is wrapped so that it takes one tensor "x" and returns one tensor
"y", and exported with the same helper as the hand-written zoo in ``forms.py``::

    from hf_forms import HF_FORMS, export_hf
    from forms import verify_export

    verify_export(export_hf("bert_sdpa", str(tmp_path / "m.onnx"), dynamo=True))

Names are ``<model>_<attn_implementation>`` with attn_implementation "eager" or "sdpa".
``HF_KNOWN_FAILURES`` gives the reason for every (name, dynamo, dynamic_batch) combination
known not to export or verify; ``hf_combos()`` lists them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from forms import SEED, UNFOLD_BUG, export_model, perturb, run_torch
from torch import nn

D, HEADS, FF, LAYERS = 32, 4, 64, 2


class OneInOneOut(nn.Module):
    """Calls ``model(**{arg: x})`` and returns the output field ``field``."""

    def __init__(self, model: nn.Module, arg: str, field: str) -> None:
        super().__init__()
        self.model, self.arg, self.field = model, arg, field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**{self.arg: x}), self.field)


def _bert(impl: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    return OneInOneOut(BertModel(cfg, add_pooling_layer=False), "input_ids", "last_hidden_state")


def _distilbert(impl: str) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(
        vocab_size=100,
        dim=D,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FF,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    return OneInOneOut(DistilBertModel(cfg), "input_ids", "last_hidden_state")


# what the ViT and Dinov2 forms share: 16×16 RGB images in 4×4 patches, the small encoder
_SMALL_IMAGE_ENCODER = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=D,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS)


def _vit(impl: str) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        **_SMALL_IMAGE_ENCODER,
        intermediate_size=FF,
        num_labels=5,
        attn_implementation=impl,
    )
    return OneInOneOut(ViTForImageClassification(cfg), "pixel_values", "logits")


def _dinov2(impl: str) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        **_SMALL_IMAGE_ENCODER,
        mlp_ratio=FF // D,
        layerscale_value=0.5,
        attn_implementation=impl,
    )
    return OneInOneOut(Dinov2Model(cfg), "pixel_values", "last_hidden_state")


def _ast(impl: str) -> nn.Module:
    from transformers import ASTConfig, ASTForAudioClassification

    cfg = ASTConfig(
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        patch_size=16,
        frequency_stride=8,
        time_stride=8,
        num_mel_bins=32,
        max_length=48,
        num_labels=3,
        attn_implementation=impl,
    )
    return OneInOneOut(ASTForAudioClassification(cfg), "input_values", "logits")


def _whisper_encoder(impl: str) -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(
        d_model=D,
        encoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        encoder_ffn_dim=FF,
        decoder_layers=1,
        decoder_attention_heads=HEADS,
        decoder_ffn_dim=FF,
        num_mel_bins=16,
        max_source_positions=16,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        attn_implementation=impl,
    )
    return OneInOneOut(WhisperModel(cfg).get_encoder(), "input_features", "last_hidden_state")


def _patchtst(norm: str) -> Callable[[str], nn.Module]:
    def build(impl: str) -> nn.Module:
        from transformers import PatchTSTConfig, PatchTSTForPrediction

        cfg = PatchTSTConfig(
            num_input_channels=3,
            context_length=64,
            patch_length=8,
            patch_stride=4,
            prediction_length=16,
            d_model=D,
            num_attention_heads=HEADS,
            num_hidden_layers=LAYERS,
            ffn_dim=FF,
            norm_type=norm,
            scaling="std",
            attn_implementation=impl,
        )
        return OneInOneOut(PatchTSTForPrediction(cfg), "past_values", "prediction_outputs")

    return build


@dataclass(frozen=True)
class HFForm:
    """A Hugging Face model family: builder (attn_implementation -> module) and its input."""

    model: str
    build: Callable[[str], nn.Module]
    input_shape: tuple[int, ...]  # per-sample shape
    token_ids: bool = False  # int64 ids in [0, 100) instead of float32 noise
    notes: str = ""


_FAMILIES = [
    HFForm("bert", _bert, (8,), token_ids=True, notes="BertModel, last_hidden_state"),
    HFForm("distilbert", _distilbert, (8,), token_ids=True, notes="DistilBertModel"),
    HFForm("vit", _vit, (3, 16, 16), notes="ViTForImageClassification, separate q/k/v"),
    HFForm("dinov2", _dinov2, (3, 16, 16), notes="Dinov2Model, LayerScale after each block"),
    HFForm("ast", _ast, (48, 32), notes="ASTForAudioClassification (audio spectrogram ViT)"),
    HFForm("whisper_enc", _whisper_encoder, (16, 32), notes="WhisperEncoder, k_proj no bias"),
    HFForm("patchtst_bn", _patchtst("batchnorm"), (64, 3), notes="PatchTSTForPrediction"),
    HFForm("patchtst_ln", _patchtst("layernorm"), (64, 3), notes="PatchTSTForPrediction"),
]

IMPLS = ("eager", "sdpa")

HF_FORMS: dict[str, tuple[HFForm, str]] = {
    f"{fam.model}_{impl}": (fam, impl) for fam in _FAMILIES for impl in IMPLS
}
"""name -> (family, attn_implementation)."""

# (name, dynamo, dynamic_batch) -> why it does not export or verify.
HF_KNOWN_FAILURES: dict[tuple[str, bool, bool], str] = {
    (f"patchtst_{norm}_{impl}", False, dyn): "PatchTSTPatchify calls unfold(dimension=-2); "
    + UNFOLD_BUG
    for norm in ("bn", "ln")
    for impl in IMPLS
    for dyn in (False, True)
}


def hf_combos() -> list[tuple[str, bool, bool, str | None]]:
    """Every (name, dynamo, dynamic_batch, failure reason or None) combination."""
    return [
        (name, dynamo, dyn, HF_KNOWN_FAILURES.get((name, dynamo, dyn)))
        for name in HF_FORMS
        for dynamo in (False, True)
        for dyn in (False, True)
    ]


def build_hf(name: str, seed: int = SEED, perturbed: bool = False) -> nn.Module:
    """The wrapped model ``name`` in eval mode with weights drawn from ``seed``.

    HF init leaves all biases 0 and LayerNorm weights 1, so the exported files share those
    initializers across layers; ``perturbed`` randomises them (see ``forms.perturb``).
    """
    family, impl = HF_FORMS[name]
    torch.manual_seed(seed)
    model = family.build(impl).eval()
    if perturbed:
        perturb(model, torch.Generator().manual_seed(seed + 1))
    return model


def make_hf_input(name: str, batch: int, seed: int = 1) -> np.ndarray:
    """An input of the model's shape with ``batch`` rows (int64 ids or float32)."""
    family, _ = HF_FORMS[name]
    rng = np.random.default_rng(seed)
    shape = (batch, *family.input_shape)
    if family.token_ids:
        return rng.integers(0, 100, size=shape, dtype=np.int64)
    x = rng.standard_normal(shape).astype(np.float32)
    if family.model.startswith("patchtst"):
        x = x + np.linspace(0.0, 3.0, shape[1], dtype=np.float32)[None, :, None] + 5.0
    return x


def export_hf(
    name: str,
    path: str,
    *,
    dynamo: bool,
    dynamic_batch: bool = True,
    batch: int = 2,
    opset: int = 18,
    perturbed: bool = False,
) -> dict[str, Any]:
    """Build HF model ``name``, export it to ``path``; same keys as ``forms.export_form``."""
    model = build_hf(name, perturbed=perturbed)
    x = make_hf_input(name, batch)
    export_model(model, x, path, dynamo=dynamo, dynamic_batch=dynamic_batch, opset=opset)
    return {
        "name": name,
        "path": path,
        "model": model,
        "input": x,
        "output": run_torch(model, x),
        "dynamo": dynamo,
        "dynamic_batch": dynamic_batch,
        "batch": batch,
        "bias": True,
        "opset": opset,
        "make_input": lambda n: make_hf_input(name, n, seed=n + 10),
    }
