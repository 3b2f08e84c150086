"""Generated univariate series for pre-training forecasters: seasonal, trend, AR,
random walk and regime switches, mixed at random (numpy only, seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("seasonal", "trend", "ar", "random_walk", "regime")


@dataclass(frozen=True)
class SyntheticConfig:
    """Mixture settings. Each series sums 1–3 component kinds drawn with ``weights``."""

    length: int = 432
    periods: tuple[int, ...] = (6, 12, 24, 48, 168)
    weights: tuple[float, ...] = (0.35, 0.15, 0.2, 0.15, 0.15)  # in KINDS order
    max_components: int = 3
    noise: float = 0.1


def seasonal(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Sum of 1–2 periodic signals (with harmonics) of periods from ``cfg.periods``."""
    t = np.arange(cfg.length)[None, :]
    out = np.zeros((n, cfg.length))
    for _ in range(2):
        period = rng.choice(cfg.periods, size=(n, 1)) * rng.uniform(0.95, 1.05, (n, 1))
        active = rng.random((n, 1)) < 0.7 if out.any() else np.ones((n, 1), bool)
        for harmonic in (1, 2, 3):
            amp = rng.normal(0, 1.0 / harmonic, (n, 1))
            phase = rng.uniform(0, 2 * np.pi, (n, 1))
            out += active * amp * np.sin(2 * np.pi * harmonic * t / period + phase)
    return out


def trend(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Linear plus quadratic trend with one random change point in slope."""
    t = np.linspace(0, 1, cfg.length)[None, :]
    slope = rng.normal(0, 2, (n, 1))
    curve = rng.normal(0, 1, (n, 1))
    knot = rng.uniform(0.2, 0.9, (n, 1))
    kink = rng.normal(0, 2, (n, 1)) * (rng.random((n, 1)) < 0.5)
    return slope * t + curve * t**2 + kink * np.maximum(t - knot, 0)


def ar(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Stationary AR(2) processes with random coefficients inside the stability triangle."""
    r = rng.uniform(0.3, 0.98, (n,))
    theta = rng.uniform(0, np.pi, (n,))
    a1, a2 = 2 * r * np.cos(theta), -(r**2)
    eps = rng.normal(0, 1, (n, cfg.length))
    x = np.zeros((n, cfg.length))
    for i in range(2, cfg.length):
        x[:, i] = a1 * x[:, i - 1] + a2 * x[:, i - 2] + eps[:, i]
    return x / (x.std(axis=1, keepdims=True) + 1e-8)


def random_walk(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random walk with drift."""
    steps = rng.normal(rng.normal(0, 0.05, (n, 1)), 1, (n, cfg.length))
    x = np.cumsum(steps, axis=1)
    return x / (x.std(axis=1, keepdims=True) + 1e-8)


def regime(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Markov regime switches: piecewise-constant level and volatility."""
    stay = rng.uniform(0.97, 0.995, (n, 1))
    switch = rng.random((n, cfg.length)) > stay
    state = np.cumsum(switch, axis=1)
    levels = rng.normal(0, 1.5, (n, cfg.length + 1))
    vols = rng.uniform(0.05, 0.6, (n, cfg.length + 1))
    rows = np.arange(n)[:, None]
    return levels[rows, state] + vols[rows, state] * rng.normal(0, 1, (n, cfg.length))


GENERATORS = {
    "seasonal": seasonal,
    "trend": trend,
    "ar": ar,
    "random_walk": random_walk,
    "regime": regime,
}


def generate(n: int, rng: np.random.Generator, cfg: SyntheticConfig | None = None) -> np.ndarray:
    """``n`` series of ``cfg.length`` steps, float32 [n, length], each a random mixture."""
    cfg = cfg or SyntheticConfig()
    probs = np.asarray(cfg.weights, float) / np.sum(cfg.weights)
    out = np.zeros((n, cfg.length))
    n_components = rng.integers(1, cfg.max_components + 1, n)
    for k in range(cfg.max_components):
        kinds = rng.choice(len(KINDS), size=n, p=probs)
        for j, name in enumerate(KINDS):
            rows = np.flatnonzero((kinds == j) & (n_components > k))
            if len(rows):
                scale = rng.lognormal(0, 0.5, (len(rows), 1))
                out[rows] += scale * GENERATORS[name](len(rows), cfg, rng)
    out += cfg.noise * rng.lognormal(0, 0.7, (n, 1)) * rng.normal(0, 1, out.shape)
    out = out * rng.lognormal(0, 1, (n, 1)) + rng.normal(0, 3, (n, 1))
    return out.astype(np.float32)
