"""PatchTST-style channel-independent forecaster (Nie et al. 2023), written for export.

Input ``x`` [B, L, C] → RevIN (per-window, per-channel mean/std, inside the model) →
patches (length P, stride S, end padding by repeating the last value) → Linear patch
embedding + learned positional embedding → channels folded into the batch
[B*C, N, D] → post-norm encoder layers (hand-written multi-head attention with
separate q/k/v/o projections, GELU FFN; LayerNorm or PatchTST's BatchNorm) →
flatten head Linear(N*D, H) → de-normalise → ``y`` [B, H, C].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class PatchTSTConfig:
    lookback: int = 336
    horizon: int = 96
    n_channels: int = 7
    patch_len: int = 16
    stride: int = 8
    d_model: int = 128
    n_heads: int = 16
    d_ff: int = 256
    n_layers: int = 3
    dropout: float = 0.2
    attn_dropout: float = 0.0
    head_dropout: float = 0.0
    norm: str = "layernorm"  # or "batchnorm"
    revin_affine: bool = True

    @property
    def n_patches(self) -> int:
        return (self.lookback + self.stride - self.patch_len) // self.stride + 1

    def to_dict(self) -> dict:
        return asdict(self)


class RevIN(nn.Module):
    """Reversible instance normalisation over the time axis of [B, L, C] windows."""

    def __init__(self, n_channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(n_channels))
            self.bias = nn.Parameter(torch.zeros(n_channels))

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=1, keepdim=True)
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps)
        z = (x - mean) / std
        if self.affine:
            z = z * self.weight + self.bias
        return z, mean, std

    def denormalise(self, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        if self.affine:
            y = (y - self.bias) / (self.weight + self.eps * self.eps)
        return y * std + mean


class Attention(nn.Module):
    """Multi-head self-attention, HF style: q/k/v/o Linear with bias, explicit softmax."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(attn_dropout)
        self.fused = False  # True: torch's fused SDPA kernel (same math, faster training)

    def _split(self, t: torch.Tensor, bsz: int, seq: int) -> torch.Tensor:
        return t.view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self._split(self.q_proj(x), bsz, seq)
        k = self._split(self.k_proj(x), bsz, seq)
        v = self._split(self.v_proj(x), bsz, seq)
        if self.fused:
            # Same math, fused kernel: only to train faster. Export takes the explicit
            # path below (export_onnx switches fused off), the graph onnxprune sees.
            p = self.dropout.p if self.training else 0.0
            ctx = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            probs = self.dropout(torch.softmax(scores, dim=-1))
            ctx = torch.matmul(probs, v)
        ctx = ctx.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim)
        return self.o_proj(ctx)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class TransposedBatchNorm(nn.Module):
    """BatchNorm1d over d_model of a [N, T, D] tensor (PatchTST's ``norm='BatchNorm'``)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def make_norm(kind: str, d_model: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d_model)
    if kind == "batchnorm":
        return TransposedBatchNorm(d_model)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'batchnorm'")


class EncoderLayer(nn.Module):
    """Post-norm encoder layer as in PatchTST: x = norm(x + attn(x)); x = norm(x + ffn(x))."""

    def __init__(self, cfg: PatchTSTConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.norm_attn = make_norm(cfg.norm, cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.ffn_dropout = nn.Dropout(cfg.dropout)
        self.norm_ffn = make_norm(cfg.norm, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_attn(x + self.attn_dropout(self.attn(x)))
        return self.norm_ffn(x + self.ffn_dropout(self.ffn(x)))


class PatchTST(nn.Module):
    def __init__(self, cfg: PatchTSTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PatchTSTConfig()
        self.revin = RevIN(cfg.n_channels, affine=cfg.revin_affine)
        self.patch_embed = nn.Linear(cfg.patch_len, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.empty(cfg.n_patches, cfg.d_model).uniform_(-0.02, 0.02))
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.head_dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(cfg.n_patches * cfg.d_model, cfg.horizon)

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, L] → [B, C, N, P], padding the end with S copies of the last value."""
        cfg = self.cfg
        pad = z[:, :, -1:].expand(-1, -1, cfg.stride)
        z = torch.cat([z, pad], dim=-1)
        return z.unfold(-1, cfg.patch_len, cfg.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        bsz, _, n_ch = x.shape
        z, mean, std = self.revin.normalise(x)
        patches = self.patchify(z.transpose(1, 2))  # [B, C, N, P]
        h = self.patch_embed(patches) + self.pos_embed  # [B, C, N, D]
        h = self.embed_dropout(h.reshape(bsz * n_ch, cfg.n_patches, cfg.d_model))
        for layer in self.layers:
            h = layer(h)
        h = self.head_dropout(h.reshape(bsz * n_ch, cfg.n_patches * cfg.d_model))
        y = self.head(h).reshape(bsz, n_ch, cfg.horizon).transpose(1, 2)  # [B, H, C]
        return self.revin.denormalise(y, mean, std)


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Switch every :class:`Attention` between torch's fused kernel and the explicit graph."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused = fused


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_onnx(
    model: nn.Module,
    path: str | Path,
    batch: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_name: str = "x",
    output_name: str = "y",
    atol: float = 1e-4,
) -> Path:
    """Export with ``torch.onnx.export(dynamo=True)`` to one self-contained file.

    ``batch=None`` makes the batch dimension dynamic; an int bakes it in. The file is
    checked with ``onnx.checker`` and its outputs compared with torch in ONNX Runtime.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if input_shape is None:
        cfg = model.cfg
        input_shape = (cfg.lookback, cfg.n_channels)
    model = model.eval()
    set_fused_attention(model, False)
    example_batch = batch if batch is not None else 2
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, *input_shape, generator=gen)
    kwargs = {}
    if batch is None:  # forward's argument is called x, whatever the exported input's name
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    # Export to a temp name, check, then move into place: never a half-written output.
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=True,
            external_data=False,
            input_names=[input_name],
            output_names=[output_name],
            **kwargs,
        )
    onnx.checker.check_model(str(tmp), full_check=True)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    for b in [batch] if batch is not None else [1, 3]:
        xb = torch.randn(b, *input_shape, generator=gen)
        with torch.no_grad():
            ref = model(xb).numpy()
        got = sess.run([output_name], {input_name: xb.numpy()})[0]
        err = float(np.max(np.abs(got - ref)))
        if got.shape != ref.shape or err > atol * max(1.0, float(np.abs(ref).max())):
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"ONNX export of {path} differs from torch: max abs err {err:.3g}")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    torch.manual_seed(0)
    m = PatchTST()
    out = export_onnx(m, Path(__file__).with_name("patchtst_etth1.onnx"))
    print(out, count_parameters(m))
