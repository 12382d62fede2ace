"""How well predictions match measured merges: R^2 of the within-k deviations and coverage.

The per-size level f(k) is the part the scaling law already gives; what the pool model adds is
which subsets of a size beat the others. So accuracy is scored on the deviations from each size's
mean CE: ``1 - sum (ce - predicted)^2 / sum (ce - mean of ce at its k)^2``; an error in a size's
level counts against it::

    within_k_r2(ce, predicted, k), coverage(ce, lo, hi)
    shape_r2(ce, predicted, k), spearman_within_k(ce, predicted, k)   # levels set aside

A prediction whose level is known to be off (the geometry before calibration) is scored on its
shape alone: both sides centred per size, and the rank correlation within each size.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def within_k_r2(measured: np.ndarray, predicted: np.ndarray, k: np.ndarray) -> float:
    """R^2 of the within-k deviations; NaN when no size holds two merges with different CEs."""
    measured, predicted, k = np.asarray(measured), np.asarray(predicted), np.asarray(k)
    centred = measured.copy()
    for size in np.unique(k):
        here = k == size
        centred[here] -= measured[here].mean()
    total = float(centred @ centred)
    if total <= 0:
        return float("nan")
    residual = measured - predicted
    return 1.0 - float(residual @ residual) / total


def coverage(measured: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Fraction of measured values inside their interval."""
    measured = np.asarray(measured)
    return float(np.mean((measured >= lo) & (measured <= hi)))


def shape_r2(measured: np.ndarray, predicted: np.ndarray, k: np.ndarray) -> float:
    """R^2 of the within-k deviations with each side centred on its own per-size mean: how
    well the prediction orders and spaces the subsets of a size, whatever its level."""
    measured, predicted, k = np.asarray(measured), np.asarray(predicted), np.asarray(k)
    shift = np.zeros_like(predicted, dtype=float)
    for size in np.unique(k):
        here = k == size
        shift[here] = predicted[here].mean() - measured[here].mean()
    return within_k_r2(measured, predicted - shift, k)


def spearman_within_k(measured: np.ndarray, predicted: np.ndarray, k: np.ndarray) -> float:
    """Mean rank correlation within each size holding three or more merges (NaN if none)."""
    measured, predicted, k = np.asarray(measured), np.asarray(predicted), np.asarray(k)
    values = [
        stats.spearmanr(measured[k == size], predicted[k == size]).statistic
        for size in np.unique(k)
        if np.sum(k == size) >= 3
    ]
    return float(np.mean(values)) if values else float("nan")
