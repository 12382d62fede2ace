"""The pool's own curve: the mean and spread of L(S) over every subset of size k, exactly.

For S uniform among the C(M, k) subsets, experts i_1..i_r are all in S with probability
``pi_r = k(k-1)...(k-r+1) / (M(M-1)...(M-r+1))``. The model's L(S) is a quadratic in the
membership indicators, so its mean needs pi_1 and pi_2 and its variance pi_1..pi_4:

    E[L | k] = f(k) + k w mean(beta) + k (k-1) w^2 mean(gamma)      (w = w(k), 1/k at overlap 1)
    Var[L | k] = sums of pi_r over the overlap patterns of two terms (see :func:`subset_moments`)

No enumeration, so any pool size works::

    mean, var = subset_moments(beta, gamma, k=4)          # the model part, batched over draws
    curve = pool_curve(model)                             # every size, with intervals
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from .design import member_weight, split
from .model import PoolModel

DEFAULT_DRAWS = 2000
_LAW_B_MAX = 20.0  # the pool model's per-size law searches b in [0, 20] as well


def inclusion(m: int, k: int, r: int) -> float:
    """Probability that r given experts are all in a uniform k-subset of m."""
    if r > k:
        return 0.0
    return math.prod((k - t) / (m - t) for t in range(r))


def subset_moments(
    beta: np.ndarray, gamma: np.ndarray, k: int, overlap: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over uniform k-subsets of ``w sum beta_i + w^2 sum_{i!=j} gamma_ij``
    (``w = 1/k`` at overlap 1: :func:`.design.member_weight`); ``beta`` (..., M), ``gamma``
    (..., M, M) symmetric with a zero diagonal."""
    beta, gamma = np.asarray(beta, dtype=float), np.asarray(gamma, dtype=float)
    m = beta.shape[-1]
    p1, p2, p3, p4 = (inclusion(m, k, r) for r in (1, 2, 3, 4))
    w = float(member_weight(k, overlap))
    a = beta * w
    c = 2.0 * gamma * w**2  # the coefficient of each pair i < j, as a full symmetric matrix
    big_a = a.sum(-1)
    row = c.sum(-1)  # r_i: the pairs containing i
    total = row.sum(-1) / 2  # T: every pair once
    s2 = (c**2).sum((-2, -1)) / 2
    sum_a2, sum_ar, sum_r2 = (a**2).sum(-1), (a * row).sum(-1), (row**2).sum(-1)
    mean = p1 * big_a + p2 * total
    second = (
        p1 * sum_a2
        + p2 * (big_a**2 - sum_a2)
        + 2 * (p2 * sum_ar + p3 * (big_a * total - sum_ar))
        + p2 * s2
        + p3 * (sum_r2 - 2 * s2)
        + p4 * (total**2 + s2 - sum_r2)
    )
    return mean, np.maximum(second - mean**2, 0.0)


def mean_row(model: PoolModel, k: int) -> np.ndarray:
    """The functional of theta that is E[L | k] over every subset of the pool."""
    m = model.m
    n_pairs = m * (m - 1) // 2
    w = float(member_weight(k, model.overlap))
    pair = 2 * w**2 * k * (k - 1) / (m * (m - 1)) if m > 1 else 0.0
    return np.concatenate(
        [model.curve.basis(np.array([k]))[0], np.full(m, w * k / m), np.full(n_pairs, pair)]
    )


@dataclass(frozen=True)
class CurvePoint:
    """E[L | k] over every subset of the pool (``mean``, interval ``lo``..``hi``) and the sd of
    L across those subsets (``spread``, interval), one merge's misfit included."""

    k: int
    n_subsets: int
    mean: float
    lo: float
    hi: float
    spread: float
    spread_lo: float
    spread_hi: float
    extrapolated: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pool_curve(
    model: PoolModel,
    ks: list[int] | None = None,
    *,
    level: float | None = None,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> list[CurvePoint]:
    """The pool's curve at ``ks`` (default: every size f(k) covers, 1..M with a law curve).

    The mean's interval is exact (a linear functional, plus the misfit averaged over the
    subsets); the spread's comes from posterior draws (median and percentiles).
    """
    level = model.level if level is None else level
    ks = [k for k in range(1, model.m + 1) if model.curve.covers(k)] if ks is None else ks
    samples = model.draws(draws, seed)
    _, beta, gamma = split(samples, model.curve.q, model.m)
    t = model.t_value(level)
    points = []
    for k in ks:
        n_subsets = math.comb(model.m, k)
        # Without intervals (an uncalibrated geometry model) the spread is the model's own.
        noise = float(model.hyper.noise_var(k)) if model.has_intervals else 0.0
        mean, var = model.linear(mean_row(model, k))
        half = t * math.sqrt(float(var[0]) + noise / n_subsets)
        _, spread_var = subset_moments(beta, gamma, k, model.overlap)
        spread = np.sqrt(spread_var + noise * (n_subsets - 1) / n_subsets)
        lo, mid, hi = np.quantile(spread, [0.5 - level / 2, 0.5, 0.5 + level / 2])
        if not model.has_intervals:
            half = lo = hi = math.nan
        points.append(
            CurvePoint(
                k=k,
                n_subsets=n_subsets,
                mean=float(mean[0]),
                lo=float(mean[0] - half),
                hi=float(mean[0] + half),
                spread=float(mid),
                spread_lo=float(lo),
                spread_hi=float(hi),
                extrapolated=model.curve.extrapolated(k),
            )
        )
    return points


def pool_law(model: PoolModel) -> dict[str, float]:
    """``L_inf + A/(k + b)`` fitted by least squares to the pool's E[L | k] at every size the
    curve covers: the law's floor and tail as this pool model sees them. (For the second-order
    expansion alone the curve is that law exactly, with b = 0; see :mod:`.geometry`.)"""
    ks = np.array([k for k in range(1, model.m + 1) if model.curve.covers(k)], dtype=float)
    means = np.array([float(model.linear(mean_row(model, int(k)))[0][0]) for k in ks])
    if ks.size < 2:
        return {"L_inf": float("nan"), "A": float("nan"), "b": float("nan")}

    def solve(b: float) -> tuple[float, np.ndarray]:
        basis = np.column_stack([np.ones_like(ks), 1.0 / (ks + b)])
        coef, *_ = np.linalg.lstsq(basis, means, rcond=None)
        return float(np.sum((basis @ coef - means) ** 2)), coef

    found = minimize_scalar(lambda b: solve(b)[0], bounds=(0.0, _LAW_B_MAX), method="bounded")
    b = 0.0 if solve(0.0)[0] <= found.fun else float(found.x)
    coef = solve(b)[1]
    return {"L_inf": float(coef[0]), "A": float(coef[1]), "b": b}
