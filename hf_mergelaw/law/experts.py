"""The experts are a sample: how far a pool's cells sit from the population's curve.

A sweep measures subsets of one pool of M experts per size. Its cell means estimate that pool's
own curve; planning ("how many experts should I train?") needs the curve of the population the
experts come from. Merges that add per-expert vectors give, to first order,

    L(S) = f_N(k) + (1/k) sum_{i in S} beta_i        (docs/law.md section 3)

so the mean over every subset of the pool is ``f_N(k) + mean(beta)``: the experts one happens to
have shift every cell of a size by the same amount, with variance ``sigma_beta^2 / M`` over pools.
This module estimates ``beta`` per size by least squares on the records' subsets (a free mean per
k), ``sigma_beta^2`` with its estimation noise removed, and draws those shifts for the bootstrap:
from a t-like distribution with M - 1 degrees of freedom (sigma is itself estimated from M
experts), correlated across sizes as far as the same-named experts' effects correlate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import f as f_dist

from .records import SweepRecords, at_size

# p-value below which the spread of the estimated effects counts as evidence of expert effects.
_EVIDENCE = 0.05


@dataclass(frozen=True)
class PoolOffsets:
    """Per size: the variance of the pool's shift from the population, and the experts behind
    it. ``sizes`` align with ``variance``; ``correlation`` is shared by every pair of sizes."""

    sizes: np.ndarray
    variance: np.ndarray
    pool_sizes: np.ndarray
    correlation: float

    def cell_covariance(self, cell_sizes: np.ndarray) -> np.ndarray:
        """Covariance of the shifts of cells at ``cell_sizes``."""
        index = np.array([_index_of(self.sizes, size) for size in cell_sizes])
        sd = np.sqrt(self.variance[index])
        same = index[:, None] == index[None, :]
        return np.outer(sd, sd) * np.where(same, 1.0, self.correlation)

    def draw(self, cell_sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, cells) shifts: one per size and replicate, the same for every k of a size."""
        m = len(self.sizes)
        cov = np.full((m, m), self.correlation) + (1 - self.correlation) * np.eye(m)
        z = rng.multivariate_normal(np.zeros(m), cov, size=n, method="eigh")
        dof = np.maximum(self.pool_sizes - 1, 1)
        scale = np.sqrt(self.variance * dof / rng.chisquare(dof, size=(n, m)))
        per_size = z * scale
        index = np.array([_index_of(self.sizes, size) for size in cell_sizes])
        return per_size[:, index]


def pool_offsets(records: SweepRecords) -> PoolOffsets | None:
    """The expert-sample part of the uncertainty, or None when the records name no subsets."""
    if records.subsets is None or any(s is None for s in records.subsets):
        return None
    sizes = np.unique(np.where(np.isfinite(records.N), records.N, -1.0))
    fits = [
        _expert_effects(records.select(at_size(records.N, None if size < 0 else size)))
        for size in sizes
    ]
    pools = np.array([len(fit.names) for fit in fits])
    return PoolOffsets(
        sizes=np.where(sizes < 0, np.nan, sizes),
        variance=_effect_variances(fits) / pools,
        pool_sizes=pools,
        correlation=_shared_correlation([dict(zip(f.names, f.beta, strict=True)) for f in fits]),
    )


@dataclass(frozen=True)
class _Effects:
    """One size's estimated expert effects and what noise alone would make of their spread."""

    names: list[str]
    beta: np.ndarray
    spread: float  # sum of squared centred estimates
    noise: float  # its expectation without expert effects
    dof: int  # residual degrees of freedom


def _effect_variances(fits: list[_Effects]) -> np.ndarray:
    """sigma_beta^2 per size, net of noise; zero everywhere unless the records, all sizes
    together, show expert effects (an F test at the _EVIDENCE level): a noise-corrected estimate
    is positive by chance half the time, and shifts drawn from chance widen the intervals for
    nothing."""
    df_effects = sum(len(f.names) - 1 for f in fits)
    df_noise = sum(f.dof for f in fits)
    noise = sum(f.noise for f in fits)
    if df_effects < 1 or df_noise < 1 or noise <= 0:
        return np.zeros(len(fits))
    if f_dist.sf(sum(f.spread for f in fits) / noise, df_effects, df_noise) > _EVIDENCE:
        return np.zeros(len(fits))
    return np.array([max(f.spread - f.noise, 0.0) / max(len(f.names) - 1, 1) for f in fits])


def _expert_effects(records: SweepRecords) -> _Effects:
    """Weighted least-squares beta (centred) with a free mean per k; rows weighted by their
    cell's inverse variance, as a merge's scatter shrinks with k."""
    names = sorted({name for subset in records.subsets for name in subset})
    column = {name: j for j, name in enumerate(names)}
    ks = np.unique(records.k)
    m, rows = len(names), len(records)
    design = np.zeros((rows, len(ks) + m))
    for r, (k, subset) in enumerate(zip(records.k, records.subsets, strict=True)):
        design[r, np.searchsorted(ks, k)] = 1.0
        design[r, [len(ks) + column[name] for name in subset]] = 1.0 / k
    sqrt_w = 1 / np.sqrt(_cell_variances(records))
    design, ce = design * sqrt_w[:, None], records.ce * sqrt_w
    # The effects are known up to a constant (the per-k means carry the level): the minimum-norm
    # solution, centred, is the sum-to-zero one. Rows at k = M carry no contrast between experts.
    gram_inv = np.linalg.pinv(design.T @ design)
    coef = gram_inv @ design.T @ ce
    beta = coef[len(ks) :] - coef[len(ks) :].mean()
    residual = ce - design @ coef
    dof = rows - np.linalg.matrix_rank(design)
    if dof < 1 or m < 2:
        return _Effects(names, beta, 0.0, 0.0, 0)
    # E[sum (beta_hat - mean)^2] = (M - 1) sigma^2 + noise variance x trace(centred covariance).
    centring = np.eye(m) - 1.0 / m
    trace = float(np.trace(centring @ gram_inv[len(ks) :, len(ks) :] @ centring))
    noise = trace * float(residual @ residual) / dof
    return _Effects(names, beta, float(beta @ beta), noise, int(dof))


def _cell_variances(records: SweepRecords) -> np.ndarray:
    """Each record's cell variance (across subsets of its k); the median for single cells."""
    by_k = {int(k): np.var(records.ce[records.k == k], ddof=1) for k in np.unique(records.k)
            if (records.k == k).sum() > 1}  # fmt: skip
    known = [v for v in by_k.values() if v > 0]
    fallback = float(np.median(known)) if known else 1.0
    return np.array([by_k.get(int(k), fallback) if by_k.get(int(k), 0) > 0 else fallback
                     for k in records.k])  # fmt: skip


def _shared_correlation(effects: list[dict[str, float]]) -> float:
    """Mean correlation, over pairs of sizes, of the same-named experts' effects (at least 0)."""
    values = []
    for i in range(len(effects)):
        for j in range(i + 1, len(effects)):
            common = sorted(set(effects[i]) & set(effects[j]))
            if len(common) >= 3:
                a = np.array([effects[i][n] for n in common])
                b = np.array([effects[j][n] for n in common])
                if a.std() > 0 and b.std() > 0:
                    values.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.clip(np.mean(values), 0.0, 1.0)) if values else 0.0


def _index_of(sizes: np.ndarray, size: float) -> int:
    matches = np.flatnonzero(at_size(sizes, None if np.isnan(size) else size))
    return int(matches[0])
