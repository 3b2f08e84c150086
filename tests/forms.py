"""A zoo of small torch transformer models, one per export form the pruner must support.

Usage from tests (``tests/`` is on ``sys.path`` through ``conftest.py``)::

    from forms import FORMS, export_form, verify_export

    info = export_form("hf_bias", str(tmp_path / "m.onnx"), dynamo=False, dynamic_batch=True)
    verify_export(info)

Every model is a real stack of transformer blocks (residual adds around attention and FFN,
LayerNorm unless the form says otherwise) that ends in a small Linear head.  Weights are
drawn from a fixed seed, norms get random affine parameters (and BatchNorm random running
statistics) and every bias is random, so that no norm is an identity and no two layers share a
parameter value (except PatchTST's frozen attention scale, shared as in PatchTST itself); all
models are in eval mode with dropout 0.

``COMBOS`` lists every (form, dynamo, dynamic_batch) combination with whether it is known to
export and verify; ``KNOWN_FAILURES`` gives the reason for each one that is not.

Export notes (torch 2.13, onnxscript 0.7, onnxruntime 1.32):

* ``nn.GELU`` becomes ``Div, Erf, Add, Mul, Mul`` at opset <= 19 with both exporters and the
  ONNX ``Gelu`` op at opset >= 20; ``ffn_gelu`` (opset 18) and ``ffn_gelu_op`` (opset 20) give
  both, and ``export_form(..., opset=...)`` overrides any form's opset.
* ``F.scaled_dot_product_attention`` becomes the fused ONNX ``Attention`` op with dynamo=True at
  opset >= 23 (form ``sdpa_attn``); the TorchScript exporter always decomposes it.
* ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` with dynamo=False: do not pass the
  bare layer to ``torch.onnx.export`` and do not export under ``torch.no_grad()``; see
  ``TEL_NOTES``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
IN_FEATURES = 12
N_OUT = 4

TEL_NOTES = """\
torch.onnx.export(dynamo=False) of a bare nn.TransformerEncoderLayer fails with
"scaled_dot_product_attention(): argument 'is_causal' must be bool, not Tensor": the TorchScript
exporter (_decide_input_format) appends the defaults of the optional forward arguments
(src_mask=None, src_key_padding_mask=None, is_causal=False) to the positional args, and the
tracer turns the Python bool False into a traced tensor, which reaches F.multi_head_attention_
forward -> scaled_dot_product_attention(is_causal=<Tensor>).  Passing is_causal explicitly
does not help (it is traced the same way).  Workaround: export a wrapper module whose forward
takes only the tensor (nn.TransformerEncoder, or any model that calls the layer itself, as
every form here does).  Second trap: under torch.no_grad()/inference_mode() in eval mode,
batch_first TransformerEncoderLayer and MultiheadAttention take the fused "fast path"
(aten::_transformer_encoder_layer_fwd / aten::_native_multi_head_attention), which the
TorchScript exporter cannot export; export with grad enabled (parameters require grad by
default) or call torch.backends.mha.set_fastpath_enabled(False) first.
enable_nested_tensor=False only avoids the nested-tensor path, which needs a padding mask
anyway.  dynamo=True has neither problem (and gives the same graph with or without no_grad)."""


# --------------------------------------------------------------------------- building blocks


class HFAttention(nn.Module):
    """Hugging Face (BERT) style: separate q/k/v/o Linear, explicit matmul/scale/softmax."""

    def __init__(self, d: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def _split(self, t: torch.Tensor, b: int, n: int) -> torch.Tensor:
        return t.view(b, n, self.h, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self._split(self.q_proj(x), b, n)
        k = self._split(self.k_proj(x), b, n)
        v = self._split(self.v_proj(x), b, n)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
        ctx = torch.matmul(scores.softmax(dim=-1), v)
        return self.o_proj(ctx.transpose(1, 2).contiguous().view(b, n, d))


class FusedAttention(nn.Module):
    """One qkv Linear; ``mode`` picks how q, k, v are taken apart.

    reshape: timm ViT, qkv.reshape(B,T,3,H,dh).permute(2,0,3,1,4).unbind(0), q scaled first.
    chunk / split: qkv.chunk(3, -1) or qkv.split(E, -1), then per-tensor view/transpose.
    """

    def __init__(self, d: int, heads: int, bias: bool, mode: str) -> None:
        super().__init__()
        self.h, self.dh, self.mode = heads, d // heads, mode
        self.scale = self.dh**-0.5
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(x)
        if self.mode == "reshape":
            q, k, v = qkv.reshape(b, n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        parts = qkv.chunk(3, dim=-1) if self.mode == "chunk" else qkv.split(d, dim=-1)
        q, k, v = (p.reshape(b, n, self.h, self.dh).transpose(1, 2) for p in parts)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._qkv(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class SDPAAttention(nn.Module):
    """Separate q/k/v/o projections around ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.out = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            p(x).view(b, n, self.h, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        ctx = F.scaled_dot_product_attention(q, k, v)
        return self.out(ctx.transpose(1, 2).reshape(b, n, d))


class MHAAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention; the module input is always [B, T, C]."""

    def __init__(self, d: int, heads: int, bias: bool, batch_first: bool, weights: bool) -> None:
        super().__init__()
        self.batch_first, self.weights = batch_first, weights
        self.mha = nn.MultiheadAttention(d, heads, dropout=0.0, bias=bias, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self.mha(x, x, x, need_weights=self.weights)[0]
        return out if self.batch_first else out.transpose(0, 1)


class PatchTSTAttention(nn.Module):
    """PatchTST _MultiheadAttention: k permuted to [B,H,dh,T], scale is a frozen Parameter."""

    def __init__(self, d: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.W_Q = nn.Linear(d, d, bias=bias)
        self.W_K = nn.Linear(d, d, bias=bias)
        self.W_V = nn.Linear(d, d, bias=bias)
        self.to_out = nn.Linear(d, d, bias=bias)
        self.scale = nn.Parameter(torch.tensor(self.dh**-0.5), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = x.size(0)
        q = self.W_Q(x).view(bs, -1, self.h, self.dh).transpose(1, 2)
        k = self.W_K(x).view(bs, -1, self.h, self.dh).permute(0, 2, 3, 1)
        v = self.W_V(x).view(bs, -1, self.h, self.dh).transpose(1, 2)
        attn = F.softmax(torch.matmul(q, k) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).contiguous().view(bs, -1, self.h * self.dh)
        return self.to_out(out)


class FFN(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, d: int, hidden: int, act: nn.Module, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.act = act
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransposedBatchNorm(nn.Module):
    """BatchNorm1d over d_model of a [B, T, D] tensor, as PatchTST applies it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """Residual attention + residual FFN, pre-norm or post-norm."""

    def __init__(
        self, attn: nn.Module, ffn: nn.Module, d: int, pre_norm: bool, norm: str = "ln"
    ) -> None:
        super().__init__()
        self.attn, self.ffn, self.pre_norm = attn, ffn, pre_norm
        self.norm1, self.norm2 = _norm(norm, d), _norm(norm, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.ffn(x))


class Stack(nn.Module):
    """Linear embedding -> blocks -> (final LayerNorm) -> per-token Linear head."""

    def __init__(self, d: int, blocks: list[nn.Module], final_norm: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, d)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d) if final_norm else nn.Identity()
        self.head = nn.Linear(d, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class TELStack(nn.Module):
    """nn.TransformerEncoder of nn.TransformerEncoderLayer; the model input is [B, T, C]."""

    def __init__(self, d: int, heads: int, bias: bool, norm_first: bool, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        act = "gelu" if norm_first else "relu"
        layer = nn.TransformerEncoderLayer(
            d,
            heads,
            2 * d,
            dropout=0.0,
            activation=act,
            batch_first=batch_first,
            norm_first=norm_first,
            bias=bias,
        )
        final = nn.LayerNorm(d) if norm_first else None
        self.embed = nn.Linear(IN_FEATURES, d)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=final, enable_nested_tensor=False)
        _reinit(self.encoder.layers[1])  # the encoder deep-copies the layer: make them differ
        self.head = nn.Linear(d, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(x)


class PatchTST(nn.Module):
    """PatchTST-style forecaster: [B, L=64, C=3] -> [B, horizon=16, C] with RevIN.

    ``unfold_dim`` is 2, or -1 as the PatchTST code writes it (which the TorchScript exporter
    mis-exports: it emits patches as [B, C, P, N], so the file fails shape inference).
    """

    def __init__(
        self, bias: bool, norm: str, d: int = 32, heads: int = 4, unfold_dim: int = 2
    ) -> None:
        super().__init__()
        self.unfold_dim = unfold_dim
        self.seq_len, self.patch, self.stride, self.horizon = 64, 8, 4, 16
        n_patches = (self.seq_len - self.patch) // self.stride + 1
        self.W_P = nn.Linear(self.patch, d)
        self.W_pos = nn.Parameter(0.02 * torch.randn(n_patches, d))
        self.layers = nn.ModuleList(
            Block(
                PatchTSTAttention(d, heads, bias),
                FFN(d, 2 * d, nn.GELU(), bias),
                d,
                pre_norm=False,
                norm=norm,
            )
            for _ in range(2)
        )
        self.head = nn.Linear(n_patches * d, self.horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + 1e-5)
        z = ((x - mean) / std).permute(0, 2, 1)  # [B, C, L]
        z = z.unfold(self.unfold_dim, self.patch, self.stride)  # [B, C, N, P]
        b, c, n, _ = z.shape
        z = self.W_P(z) + self.W_pos
        z = z.reshape(b * c, n, -1)
        for layer in self.layers:
            z = layer(z)
        y = self.head(z.reshape(b, c, -1))  # [B, C, horizon]
        return y.permute(0, 2, 1) * std + mean


def _reinit(module: nn.Module) -> None:
    """Fresh random weights for every Linear / MultiheadAttention inside ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.MultiheadAttention):
            m._reset_parameters()


def _norm(kind: str, d: int) -> nn.Module:
    return TransposedBatchNorm(d) if kind == "bn" else nn.LayerNorm(d)


# --------------------------------------------------------------------------- form registry

Builder = Callable[[bool], nn.Module]


@dataclass(frozen=True)
class Form:
    """One export form: how to build it and what it is fed."""

    name: str
    build: Builder
    input_shape: tuple[int, ...]  # per-sample shape (without the batch dimension)
    bias: bool = True
    opset: int = 18
    notes: str = ""


def _stack(
    attn: Callable[[bool], nn.Module],
    ffn: Callable[[bool], nn.Module],
    d: int,
    pre_norm: bool = True,
) -> Builder:
    def build(bias: bool) -> nn.Module:
        blocks = [Block(attn(bias), ffn(bias), d, pre_norm) for _ in range(2)]
        return Stack(d, blocks, final_norm=pre_norm)

    return build


def _mlp(d: int, hidden: int, act: Callable[[], nn.Module]) -> Callable[[bool], nn.Module]:
    return lambda bias: FFN(d, hidden, act(), bias)


def _hf(d: int = 32, heads: int = 4) -> Builder:
    return _stack(lambda b: HFAttention(d, heads, b), _mlp(d, 4 * d, nn.GELU), d, pre_norm=False)


def _fused(mode: str, d: int, heads: int, hidden: int) -> Builder:
    return _stack(lambda b: FusedAttention(d, heads, b, mode), _mlp(d, hidden, nn.GELU), d)


def _mha(batch_first: bool, weights: bool, d: int = 32, heads: int = 2) -> Builder:
    return _stack(
        lambda b: MHAAttention(d, heads, b, batch_first, weights), _mlp(d, 2 * d, nn.GELU), d
    )


def _tel(norm_first: bool, batch_first: bool) -> Builder:
    return lambda bias: TELStack(32, 4, bias, norm_first, batch_first)


def _sdpa(d: int = 48, heads: int = 4) -> Builder:
    return _stack(lambda b: SDPAAttention(d, heads, b), _mlp(d, 2 * d, nn.GELU), d)


def _ffn(act: Callable[[], nn.Module] | None, d: int = 32, heads: int = 4) -> Builder:
    hidden = 3 * d
    ffn = (lambda b: SwiGLU(d, hidden, b)) if act is None else _mlp(d, hidden, act)
    return _stack(lambda b: HFAttention(d, heads, b), ffn, d)


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


SEQ = (7, IN_FEATURES)
TS = (64, 3)

_FORM_LIST = [
    Form("hf_bias", _hf(), SEQ, notes="BERT-like post-norm, q/k/v/o Linear, d32 h4"),
    Form("hf_nobias", _hf(), SEQ, bias=False, notes="as hf_bias without any Linear bias"),
    Form(
        "fused_reshape",
        _fused("reshape", 48, 3, 144),
        (10, IN_FEATURES),
        notes="timm ViT qkv.reshape.permute.unbind, d48 h3; FFN hidden == 3d == qkv width",
    ),
    Form("fused_chunk", _fused("chunk", 48, 4, 96), SEQ, notes="qkv.chunk(3, -1), d48 h4"),
    Form("fused_split", _fused("split", 64, 2, 128), SEQ, notes="qkv.split(E, -1), d64 h2"),
    Form(
        "mha_bf",
        _mha(True, False),
        SEQ,
        notes="nn.MultiheadAttention batch_first, need_weights=False (SDPA path)",
    ),
    Form(
        "mha_sf",
        _mha(False, False),
        SEQ,
        notes="nn.MultiheadAttention seq-first, need_weights=False",
    ),
    Form(
        "mha_bf_weights",
        _mha(True, True),
        SEQ,
        notes="mha(x, x, x)[0] with the default need_weights=True (explicit bmm/softmax path)",
    ),
    Form("tel_pre_bf", _tel(True, True), SEQ, notes="TransformerEncoderLayer norm_first, gelu"),
    Form("tel_post_bf", _tel(False, True), SEQ, notes="TransformerEncoderLayer post-norm, relu"),
    Form("tel_pre_sf", _tel(True, False), SEQ, notes="as tel_pre_bf, batch_first=False"),
    Form("tel_post_sf", _tel(False, False), SEQ, notes="as tel_post_bf, batch_first=False"),
    Form("sdpa", _sdpa(), SEQ, notes="q/k/v/o Linear + F.scaled_dot_product_attention, d48 h4"),
    Form(
        "sdpa_attn",
        _sdpa(),
        SEQ,
        opset=23,
        notes="sdpa at opset 23: dynamo=True emits the ONNX Attention op",
    ),
    Form("patchtst_ln", lambda b: PatchTST(b, "ln"), TS, notes="RevIN, patches 8/4, LayerNorm"),
    Form(
        "patchtst_bn",
        lambda b: PatchTST(b, "bn"),
        TS,
        notes="as patchtst_ln with BatchNorm1d over d_model",
    ),
    Form(
        "patchtst_unfold_neg",
        lambda b: PatchTST(b, "ln", unfold_dim=-1),
        TS,
        notes="patchtst_ln with unfold(-1, ...) as in PatchTST; broken with dynamo=False",
    ),
    Form("ffn_gelu", _ffn(nn.GELU), SEQ, notes="GELU at opset 18: Div/Erf/Add/Mul/Mul"),
    Form("ffn_gelu_op", _ffn(nn.GELU), SEQ, opset=20, notes="GELU at opset 20: Gelu op"),
    Form("ffn_gelu_tanh", _ffn(_gelu_tanh), SEQ, notes="GELU(approximate='tanh') at opset 18"),
    Form("ffn_relu", _ffn(nn.ReLU), SEQ),
    Form("ffn_silu", _ffn(nn.SiLU), SEQ),
    Form("ffn_swiglu", _ffn(None), SEQ, bias=False, notes="down(silu(gate(x)) * up(x)), no bias"),
]

FORMS: dict[str, Form] = {f.name: f for f in _FORM_LIST}

UNFOLD_BUG = (
    "TorchScript exporter bug: Tensor.unfold with a negative dim gets the wrong axis order "
    "(symbolic_opset9.unfold does perm.append(perm.pop(dimension)) and Unsqueeze/Concat on axis "
    "`dimension`, which only works for a non-negative dim; unfold(-1) on [B,C,L] gives "
    "[B,C,P,N] instead of [B,C,N,P]); the file is written but fails onnx.checker full_check "
    "and onnxruntime load (shape inference error); dynamo=True is fine"
)

# (form, dynamo, dynamic_batch) -> why it does not export or verify.
KNOWN_FAILURES: dict[tuple[str, bool, bool], str] = {
    ("patchtst_unfold_neg", False, False): UNFOLD_BUG,
    ("patchtst_unfold_neg", False, True): UNFOLD_BUG,
}

PITFALLS: dict[str, str] = {
    "bare TransformerEncoderLayer, dynamo=False": TEL_NOTES,
    "torch.no_grad() export, dynamo=False": (
        "batch_first nn.MultiheadAttention / nn.TransformerEncoderLayer in eval mode under "
        "no_grad take the fast path: UnsupportedOperatorError for "
        "aten::_native_multi_head_attention / aten::_transformer_encoder_layer_fwd. "
        "Fix: grad enabled, or torch.backends.mha.set_fastpath_enabled(False). "
        "batch_first=False modules and dynamo=True are unaffected (same graph either way)."
    ),
    "unfold(-1), dynamo=False": UNFOLD_BUG + "; use a positive dim",
    "example batch 1, dynamo=True": (
        "torch.onnx.export turns Dim('batch') into an automatic dim, so a batch the model "
        "specializes (seq-first nn.MultiheadAttention at batch 1) silently becomes a fixed "
        "input dim of 1 instead of raising; export_model checks for it"
    ),
}
"""Export traps found while building the zoo that a form cannot show as a failing combo."""

COMBOS: list[tuple[str, bool, bool, str | None]] = [
    (name, dynamo, dyn, KNOWN_FAILURES.get((name, dynamo, dyn)))
    for name in FORMS
    for dynamo in (False, True)
    for dyn in (False, True)
]
"""Every (form, dynamo, dynamic_batch, failure reason or None) combination."""


def working_combos() -> list[tuple[str, bool, bool]]:
    """The (form, dynamo, dynamic_batch) combinations known to export and verify."""
    return [(n, d, b) for n, d, b, why in COMBOS if why is None]


# --------------------------------------------------------------------------- build and export


def perturb(model: nn.Module, gen: torch.Generator) -> None:
    """Make every norm, bias and BatchNorm statistic non-trivial and distinct.

    Default inits leave LayerNorm weights at 1 and many biases (MultiheadAttention, HF) at 0;
    such tensors would hide slicing bugs, and both exporters share identical-valued
    initializers between layers (dynamo by reusing one initializer, TorchScript through
    Identity nodes).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm | nn.BatchNorm1d) and m.weight is not None:
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1.0 + 0.3 * torch.rand(m.running_var.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build_form(name: str, bias: bool | None = None, seed: int = SEED) -> nn.Module:
    """The form's model in eval mode, with weights drawn from ``seed``."""
    form = FORMS[name]
    torch.manual_seed(seed)
    model = form.build(form.bias if bias is None else bias)
    perturb(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def make_input(name: str, batch: int, seed: int = 1) -> np.ndarray:
    """A float32 input of the form's shape with ``batch`` rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *FORMS[name].input_shape)).astype(np.float32)
    if name.startswith("patchtst"):  # a series with a level and a trend, as RevIN expects
        x = x + np.linspace(0.0, 3.0, x.shape[1], dtype=np.float32)[None, :, None] + 5.0
    return x


def run_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's output for a numpy input."""
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def export_model(
    model: nn.Module, x: np.ndarray, path: str, *, dynamo: bool, dynamic_batch: bool, opset: int
) -> None:
    """``torch.onnx.export`` with input "x", output "y" and weights inside the file.

    Runs with grad enabled on purpose: under no_grad the nn.TransformerEncoderLayer /
    nn.MultiheadAttention fast paths cannot be exported by the TorchScript exporter.  Raises
    if a dynamic batch came out fixed: with dynamo=True, torch.onnx.export quietly specializes
    a batch it cannot keep symbolic (seq-first MultiheadAttention with an example batch of 1).
    """
    kwargs: dict[str, Any] = {
        "input_names": ["x"],
        "output_names": ["y"],
        "opset_version": opset,
        "dynamo": dynamo,
        "external_data": False,
    }
    if dynamic_batch and dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    if dynamo:
        kwargs["verbose"] = False
        _cache_torchlib_registry()
    with _quiet():
        torch.onnx.export(model, (torch.from_numpy(x),), path, **kwargs)
    if dynamic_batch and not _batch_is_symbolic(path):
        raise ValueError(
            f"{path}: the batch dimension was specialized to {len(x)}; "
            "export with an example batch of 2 or more"
        )


def _batch_is_symbolic(path: str) -> bool:
    import onnx

    dim = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return bool(dim.dim_param) or not dim.HasField("dim_value")


def _cache_torchlib_registry() -> None:
    """Build the dynamo exporter's op registry once per process instead of once per export.

    torch.onnx.export(dynamo=True) rebuilds ONNXRegistry.from_torchlib() on every call (about
    0.5 s of parsing onnxscript sources, ~20% of a small export).  Export only reads the registry
    (torch 2.13), and each call still gets its own copy of the function table, so the exported
    files are unchanged.  Private API: does nothing if it has moved.
    """
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    cls = getattr(_registration, "ONNXRegistry", None)
    build = getattr(getattr(cls, "from_torchlib", None), "__func__", None)
    if build is None or getattr(build, "_cached", False):
        return
    built: dict[Any, Any] = {}

    def from_torchlib(klass: type, opset_version: int | None = None) -> Any:
        key = opset_version
        if key not in built:
            built[key] = build(klass) if key is None else build(klass, key)
        reg = copy.copy(built[key])
        reg.functions = {k: list(v) for k, v in built[key].functions.items()}
        return reg

    from_torchlib._cached = True  # type: ignore[attr-defined]
    cls.from_torchlib = classmethod(from_torchlib)


_NOISY_LOGGERS = (
    "torch.onnx._internal.exporter._registration",  # "torchvision is not installed"
    "onnxscript.optimizer._constant_folding",  # harmless "Evaluation failed" while folding
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter warnings and the two chatty loggers for the duration of an export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_form(
    name: str,
    path: str,
    *,
    dynamo: bool,
    dynamic_batch: bool,
    batch: int = 2,
    bias: bool | None = None,
    opset: int | None = None,
) -> dict[str, Any]:
    """Build form ``name`` (fixed seed), export it to ``path`` and return what tests need.

    Keys: name, path, model, input (float32 [batch, ...]), output (torch's output for it),
    dynamo, dynamic_batch, batch, bias, opset, make_input (batch -> input array).
    """
    form = FORMS[name]
    bias = form.bias if bias is None else bias
    opset = form.opset if opset is None else opset
    model = build_form(name, bias)
    x = make_input(name, batch)
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
        "bias": bias,
        "opset": opset,
        "make_input": lambda n: make_input(name, n, seed=n + 10),
    }


# --------------------------------------------------------------------------- verification


def run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    """Output "y" of the ONNX file at ``path`` on onnxruntime's CPU provider."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def verify_export(
    info: dict[str, Any], atol: float = 1e-4, other_batches: tuple[int, ...] = (1, 3)
) -> None:
    """Full ONNX check, onnxruntime vs torch, and other batch sizes when the batch is dynamic."""
    import onnx

    onnx.checker.check_model(onnx.load(info["path"]), full_check=True)
    cases = [(info["input"], info["output"])]
    if info["dynamic_batch"]:
        for n in other_batches:
            x = info["make_input"](n)
            cases.append((x, run_torch(info["model"], x)))
    for x, want in cases:
        got = run_onnx(info["path"], x)
        assert got.shape == want.shape, (got.shape, want.shape)
        err = float(np.max(np.abs(got - want)))
        assert err <= atol, f"{info['name']}: max abs error {err:.3g} > {atol} at batch {len(x)}"
