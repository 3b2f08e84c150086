"""The least-squares problems of one block, from accumulated moments (normal equations).

With ``x`` the kept inputs of the output projection in the cut model (rows of ``X``, K
wide) and ``y`` the block output of the original model (D wide), every fit minimises
``‖X·W + 1·bᵀ − Y‖²`` over the fit slice, damped towards the cut's own weight ``W0``:

- ``bias``: ``W = W0``, ``b = mean(y) − W0ᵀ·mean(x)``: FLAP's bias compensation (the mean
  contribution of the removed rows moved into the bias; with earlier blocks pruned it also
  absorbs their mean drift);
- ``scale``: one factor per kept head (attention) or channel (FFN) on its rows of ``W0``
  (Kwon et al. 2022, mask tuning), damped towards 1, then the bias as above;
- ``refit``: a ridge regression of the whole ``W`` on the kept rows, damped towards ``W0``,
  with the bias re-fitted (centred moments: the bias is not damped).

The damping is ``λ = α·trace/size`` with α from :data:`ALPHAS`; which α (and, under ``auto``,
which fit) is chosen on the held-out slice's moments. A projection without a bias keeps
none: its fits use raw moments and ``b = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class Moments:
    """Sums over rows: ``XᵀX``, ``XᵀY``, ``Σx``, ``Σy``, ``Σ‖y‖²`` and the row count."""

    xx: np.ndarray
    xy: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    yy: float = 0.0
    n: int = 0

    @classmethod
    def zeros(cls, k: int, d: int) -> Moments:
        return cls(np.zeros((k, k)), np.zeros((k, d)), np.zeros(k), np.zeros(d))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add a batch's rows. Products are formed in the batch's own precision (float32
        from ONNX Runtime: BLAS at twice float64's speed; float16 is widened to float32)
        and accumulated in float64."""
        work = np.float64 if x.dtype == np.float64 or y.dtype == np.float64 else np.float32
        x = np.asarray(x, work).reshape(-1, self.xx.shape[0])
        y = np.asarray(y, work).reshape(-1, self.xy.shape[1])
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.sx += x.sum(axis=0, dtype=np.float64)
        self.sy += y.sum(axis=0, dtype=np.float64)
        self.yy += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        self.n += len(x)

    def centred(self) -> tuple[np.ndarray, np.ndarray]:
        """``XᵀX`` and ``XᵀY`` of the mean-free rows."""
        n = max(self.n, 1)
        return (self.xx - np.outer(self.sx, self.sx) / n,
                self.xy - np.outer(self.sx, self.sy) / n)


@dataclass
class Fit:
    """A candidate for the projection: effective weight ``[K, D]`` and bias ``[D]``."""

    method: str
    weight: np.ndarray
    bias: np.ndarray
    damping: float | None = None


def error(m: Moments, fit: Fit) -> float:
    """``Σ‖x·W + b − y‖²`` over the rows the moments summed."""
    w, b = fit.weight, fit.bias
    return float(np.einsum("ij,ij->", w, m.xx @ w) - 2 * np.einsum("ij,ij->", w, m.xy)
                 + m.yy + 2 * b @ (w.T @ m.sx) - 2 * b @ m.sy + m.n * b @ b)


@dataclass
class Problem:
    """One block's least squares: the fit slice's moments, the cut's weight ``w0`` [K, D]
    and bias ``b0`` (None: the projection has none and keeps none), and the head or
    channel of each kept row (None: unknown, no scales)."""

    moments: Moments
    w0: np.ndarray
    b0: np.ndarray | None
    groups: np.ndarray | None

    def normal_equations(self) -> tuple[np.ndarray, np.ndarray]:
        """``XᵀX`` and ``XᵀY``, centred when the bias is re-fitted."""
        m = self.moments
        return (m.xx, m.xy) if self.b0 is None else m.centred()

    def bias_for(self, w: np.ndarray) -> np.ndarray:
        if self.b0 is None:
            return np.zeros(w.shape[1])
        m = self.moments
        return (m.sy - w.T @ m.sx) / max(m.n, 1)


def _keep(p: Problem) -> list[Fit]:
    return [Fit("none", p.w0, np.zeros(p.w0.shape[1]) if p.b0 is None else p.b0)]


def _compensate_bias(p: Problem) -> list[Fit]:
    return [] if p.b0 is None else [Fit("bias", p.w0, p.bias_for(p.w0))]


def _scale(p: Problem) -> list[Fit]:
    if p.groups is None:
        return []
    xx, xy = p.normal_equations()
    return [Fit("scale", w, p.bias_for(w), lam) for w, lam in _scaled(xx, xy, p.w0, p.groups)]


def _refit(p: Problem) -> list[Fit]:
    xx, xy = p.normal_equations()
    return [Fit("refit", w, p.bias_for(w), lam) for w, lam in _refitted(xx, xy, p.w0)]


# method -> its fits (one per damping where it has one)
FITS = {"none": _keep, "bias": _compensate_bias, "scale": _scale, "refit": _refit}


def candidates(problem: Problem, methods: tuple[str, ...]) -> list[Fit]:
    """Every fit of ``methods`` for ``problem``."""
    return [fit for method in methods for fit in FITS[method](problem)]


def _scaled(xx: np.ndarray, xy: np.ndarray, w0: np.ndarray, groups: np.ndarray):
    """``W = diag(s[groups])·W0``: ``s`` solves ``(M + λI)s = r + λ`` with ``M`` the Gram
    matrix of the groups' contributions ``X_g·W0_g`` and ``r`` their products with Y."""
    ids, row_group = np.unique(groups, return_inverse=True)
    onehot = np.zeros((len(groups), len(ids)))
    onehot[np.arange(len(groups)), row_group] = 1.0
    gram = onehot.T @ (xx * (w0 @ w0.T)) @ onehot
    rhs = onehot.T @ np.einsum("ij,ij->i", xy, w0)
    scale = np.trace(gram) / len(ids) or 1.0
    for alpha in ALPHAS:
        lam = alpha * scale
        s = _solve(gram + lam * np.eye(len(ids)), rhs + lam)
        yield w0 * (onehot @ s)[:, None], lam


def _refitted(xx: np.ndarray, xy: np.ndarray, w0: np.ndarray):
    """Ridge towards ``W0``: ``(XᵀX + λI)W = XᵀY + λ·W0``."""
    scale = np.trace(xx) / len(xx) or 1.0
    for alpha in ALPHAS:
        lam = alpha * scale
        yield _solve(xx + lam * np.eye(len(xx)), xy + lam * w0), lam


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.solve(a, b, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return scipy.linalg.lstsq(a, b, check_finite=False)[0]


def best(fits: list[Fit], held: Moments) -> tuple[Fit, float]:
    """The fit with the least held-out error, and that error (ties: the first)."""
    errors = [error(held, f) for f in fits]
    i = int(np.argmin(errors))
    return fits[i], errors[i]
