"""A small time-series foundation model: a wider, deeper PatchTST-style encoder.

6 post-norm layers, d_model 256, 8 heads, FFN 512, patch 16 / stride 8 over a 336-step
lookback, horizon 96. Channel-independent with parameter-free RevIN, so the same
weights forecast any number of channels; the exported file takes [B, 336, 7] (the ETT
layout). Pre-trained by ``tools/train_tsfm.py`` on ETTh2 plus generated series, never
on ETTh1, which is kept for zero-shot and fine-tuning evaluation.
"""

from __future__ import annotations

from models.patchtst import PatchTST, PatchTSTConfig


def tsfm_config(n_channels: int = 7, dropout: float = 0.1) -> PatchTSTConfig:
    return PatchTSTConfig(
        lookback=336,
        horizon=96,
        n_channels=n_channels,
        patch_len=16,
        stride=8,
        d_model=256,
        n_heads=8,
        d_ff=512,
        n_layers=6,
        dropout=dropout,
        head_dropout=0.0,
        norm="layernorm",
        revin_affine=False,
    )


def build_tsfm(n_channels: int = 7, dropout: float = 0.1) -> PatchTST:
    return PatchTST(tsfm_config(n_channels, dropout))
