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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg
import scipy.sparse

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

    @cached_property
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


def _scale(p: Problem) -> Iterator[Fit]:
    if p.groups is None:
        return
    xx, xy = p.normal_equations
    for w, lam in _scaled(xx, xy, p.w0, p.groups):
        yield Fit("scale", w, p.bias_for(w), lam)


def _refit(p: Problem) -> Iterator[Fit]:
    xx, xy = p.normal_equations
    for w, lam in _refitted(xx, xy, p.w0):
        yield Fit("refit", w, p.bias_for(w), lam)


# method -> its fits (one per damping where it has one)
FITS = {"none": _keep, "bias": _compensate_bias, "scale": _scale, "refit": _refit}


def fits(problem: Problem, methods: tuple[str, ...]) -> Iterator[Fit]:
    """Every fit of ``methods`` for ``problem``, made one at a time (each is a [K, D]
    weight: a large block's ten at once would take more than the model)."""
    for method in methods:
        yield from FITS[method](problem)


def candidates(problem: Problem, methods: tuple[str, ...]) -> list[Fit]:
    """Every fit of ``methods`` for ``problem``."""
    return list(fits(problem, methods))


def _scaled(xx: np.ndarray, xy: np.ndarray, w0: np.ndarray, groups: np.ndarray):
    """``W = diag(s[groups])·W0``: ``s`` solves ``(M + λI)s = r + λ`` with ``M`` the Gram
    matrix of the groups' contributions ``X_g·W0_g`` and ``r`` their products with Y."""
    ids, row_group = np.unique(groups, return_inverse=True)
    gram = w0 @ w0.T
    gram *= xx                          # the rows' contributions' Gram matrix
    rhs = np.einsum("ij,ij->i", xy, w0)
    if len(ids) < len(groups):          # summed over each group's rows (a sparse one-hot)
        onehot = scipy.sparse.csr_matrix((np.ones(len(groups)), (np.arange(len(groups)),
                                                                  row_group)),
                                         shape=(len(groups), len(ids)))
        gram = np.asarray(onehot.T @ np.asarray(onehot.T @ gram).T)
        rhs = onehot.T @ rhs
    else:                               # a group per row (FFN channels): solved row-wise
        row_group = np.arange(len(groups))
    scale = np.trace(gram) / len(gram) or 1.0
    for alpha in ALPHAS:
        lam = alpha * scale
        s = _solve(gram, lam, rhs + lam)
        yield w0 * s[row_group][:, None], lam


def _refitted(xx: np.ndarray, xy: np.ndarray, w0: np.ndarray):
    """Ridge towards ``W0``: ``(XᵀX + λI)W = XᵀY + λ·W0``."""
    scale = np.trace(xx) / len(xx) or 1.0
    for alpha in ALPHAS:
        lam = alpha * scale
        yield _solve(xx, lam, xy + lam * w0), lam


def _solve(a: np.ndarray, lam: float, b: np.ndarray) -> np.ndarray:
    """``(a + λI)⁻¹·b`` (``a`` symmetric, left as it is)."""
    damped = a.copy()
    damped.flat[::len(a) + 1] += lam
    try:
        return scipy.linalg.solve(damped, b, assume_a="pos", check_finite=False,
                                  overwrite_a=True)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        damped = a.copy()
        damped.flat[::len(a) + 1] += lam
        return scipy.linalg.lstsq(damped, b, check_finite=False, overwrite_a=True)[0]


def best(fits: Iterable[Fit], held: Moments) -> tuple[Fit, float] | None:
    """The fit with the least held-out error, and that error (ties: the first); None when
    there is none."""
    found = None
    for fit in fits:
        err = error(held, fit)
        if found is None or err < found[1]:
            found = (fit, err)
    return found
