"""Mask rearrangement (Kwon et al. 2022, §4.2): with the number of units to remove in a
block fixed by the search, choose *which* ones with the block's empirical Fisher, off-diagonal
terms included, not only each unit's own score.

With Δ the indicator of the removed units, the second-order estimate of the loss increase is
``E(Δ) = lᵀΔ + ½·ΔᵀFΔ``: F = mean_n g_n g_nᵀ (the empirical Fisher of the gate gradients) and
l = −mean g where the loss has labels (0 for self-distillation, where E[g] = 0). Units are
swapped between the removed and the kept sets, the best swap first, until none lowers E.
"""

from __future__ import annotations

import numpy as np

MAX_SWAPS = 256


def estimated_loss(removed: np.ndarray, linear: np.ndarray, fisher: np.ndarray) -> float:
    """E(Δ) = lᵀΔ + ½ ΔᵀFΔ for the boolean mask ``removed``."""
    delta = removed.astype(np.float64)
    return float(linear @ delta + 0.5 * delta @ fisher @ delta)


def rearrange(removed: np.ndarray, linear: np.ndarray, fisher: np.ndarray,
              max_swaps: int = MAX_SWAPS) -> tuple[np.ndarray, int]:
    """The removed mask after greedy best-first swaps (same count), and the swaps made."""
    removed = removed.astype(bool).copy()
    if removed.all() or not removed.any():
        return removed, 0
    diag = np.diag(fisher)
    coupling = fisher[:, removed].sum(axis=1)            # (FΔ)_u
    swaps = 0
    while swaps < max_swaps:
        out, kept = np.flatnonzero(removed), np.flatnonzero(~removed)
        # E after removing v instead of u: + (l_v + c_v + ½F_vv) − (l_u + c_u − ½F_uu) − F_uv
        add = linear[kept] + coupling[kept] + 0.5 * diag[kept]
        drop = linear[out] + coupling[out] - 0.5 * diag[out]
        change = add[None, :] - drop[:, None] - fisher[np.ix_(out, kept)]
        u, v = np.unravel_index(int(np.argmin(change)), change.shape)
        scale = max(abs(estimated_loss(removed, linear, fisher)), 1e-30)
        if change[u, v] >= -1e-9 * scale:
            break
        removed[out[u]], removed[kept[v]] = False, True
        coupling += fisher[:, kept[v]] - fisher[:, out[u]]
        swaps += 1
    return removed, swaps
