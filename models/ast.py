"""AST-style audio spectrogram transformer (Gong et al. 2021), small, written for export.

Input ``x`` [B, 1, n_mels, n_frames] log-mel (as made by
:func:`onnxprune.datasets.audio.load_fsdd`) → fixed dataset normalisation (constants
inside the graph) → 16×16 patches (Conv2d, stride 16 over mels and ``time_stride``
over frames) → class token + learned positional embedding → pre-norm encoder layers
(hand-written attention with separate q/k/v/o projections, GELU FFN) → LayerNorm →
Linear on the class token → ``logits`` [B, n_classes].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.patchtst import Attention, FeedForward


@dataclass
class ASTConfig:
    n_mels: int = 64
    n_frames: int = 96
    patch: int = 16
    freq_stride: int = 16
    time_stride: int = 16
    d_model: int = 192
    n_heads: int = 6
    d_ff: int = 768
    n_layers: int = 6
    n_classes: int = 10
    dropout: float = 0.1
    attn_dropout: float = 0.0

    @property
    def grid(self) -> tuple[int, int]:
        return (
            (self.n_mels - self.patch) // self.freq_stride + 1,
            (self.n_frames - self.patch) // self.time_stride + 1,
        )

    @property
    def n_tokens(self) -> int:
        f, t = self.grid
        return f * t + 1

    def to_dict(self) -> dict:
        return asdict(self)


class PreNormLayer(nn.Module):
    """ViT/AST layer: x = x + attn(norm(x)); x = x + ffn(norm(x))."""

    def __init__(self, cfg: ASTConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.norm_ffn = nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x)))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class AST(nn.Module):
    def __init__(self, cfg: ASTConfig | None = None, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ASTConfig()
        self.register_buffer("feat_mean", torch.tensor(float(mean)))
        self.register_buffer("feat_scale", torch.tensor(1.0 / (2.0 * float(std))))
        self.patch_embed = nn.Conv2d(
            1, cfg.d_model, cfg.patch, stride=(cfg.freq_stride, cfg.time_stride)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.n_tokens, cfg.d_model).normal_(0, 0.02))
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(PreNormLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.feat_mean) * self.feat_scale
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, F*T, D]
        cls = self.cls_token.expand(h.shape[0], -1, -1)
        h = self.embed_dropout(torch.cat([cls, h], dim=1) + self.pos_embed)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h[:, 0]))


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
