"""How much to shrink: the prior scales chosen by marginal likelihood (empirical Bayes).

The model (see :mod:`.design`) is a Gaussian linear model::

    ce = Z(overlap) theta + e,   e ~ N(0, sigma^2 k^-rho)    (misfit of one merge of size k)
    beta_i ~ N(0, tau_beta^2),  gamma_ij ~ N(0, tau_gamma^2),  curve part flat

(with an effect prior, :mod:`.prior`, beta and gamma are its features' flat-scaled sum plus
these deviations). Zero is the exchangeable model (every expert alike, every pair alike: the
pool's means of beta and gamma are absorbed by f(k)), so the priors shrink each expert's and
each pair's effect toward it by as much as the data say. ``tau_beta``, ``tau_gamma`` and ``rho``
maximise the integrated likelihood (the parameters integrated out, the flat part included,
``sigma`` profiled), never a hand-set constant; so does the members' ``overlap`` (how a member's
weight falls with k, :mod:`.design`) where it beats an average's 1/k (:func:`choose_overlap`).
With ``lambda = tau^2 / sigma^2`` and ``A = Z'WZ + diag(0, 1/lambda)`` (q: the flat parameters):

    log p(ce) = -(n - q)/2 log sigma^2 + 1/2 sum log w - 1/2 log|Lambda| - 1/2 log|A| + const,
    sigma^2 = (ce'W ce - ce'WZ A^-1 Z'W ce) / (n - q)

Everything is computed from per-size sufficient statistics (:class:`SizeStats`): a design row's
curve part depends on k alone and so do its weight and its effect columns' scale, so one
evaluation costs one Cholesky factorisation of a (q + M + P)-square matrix whatever the number
of records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.optimize import minimize
from scipy.special import logsumexp

from .design import Curve, effect_design, member_weight
from .prior import EffectPrior

# Search box of log(tau^2 / sigma^2) and of rho (noise falling as k^-rho, or growing a little).
_LOG_LAMBDA_BOUNDS = (-25.0, 25.0)
_RHO_BOUNDS = (-1.0, 3.0)
# From a plain sum of the members' vectors (0) to their average (1).
_OVERLAP_BOUNDS = (0.0, 1.0)
_START_GRID = ((-6.0, -2.0, 2.0, 6.0), (-6.0, -2.0, 2.0, 6.0), (0.0, 1.5), (0.3, 1.0))
# Points of the uniform prior over the overlap at which a free overlap's evidence is integrated,
# and the Bayes factor it must beat the average's 1/k by: 3, Kass and Raftery's "positive"
# evidence. Below it, sweeps of fewer merges than parameters took a free overlap from noise.
_OVERLAP_GRID = np.linspace(*_OVERLAP_BOUNDS, 41)
_OVERLAP_BAYES_FACTOR = 3.0
_SIMPLEX_OPTIONS = {"xatol": 1e-2, "fatol": 1e-3, "maxiter": 2000}
# b values the per-size law's curve is tried at (b >= 0 as in the law; small b is the norm).
LAW_B_GRID = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)


@dataclass(frozen=True)
class Hyper:
    """Prior sd of an expert's effect and of a pair's, misfit sd of one merge at k = 1, how
    the misfit variance falls with k (``sigma^2 k^-rho``), and the members' ``overlap``
    (:func:`.design.member_weight`; 1, the average's 1/k, in pool files that predate it)."""

    tau_beta: float
    tau_gamma: float
    sigma: float
    rho: float
    overlap: float = 1.0

    def noise_var(self, k: np.ndarray | int) -> np.ndarray:
        return self.sigma**2 * np.asarray(k, dtype=float) ** -self.rho

    def search_point(self) -> np.ndarray:
        """(log lambda_beta, log lambda_gamma, rho, overlap): where :func:`choose` searches."""
        return np.array(
            [
                2 * np.log(self.tau_beta / self.sigma),
                2 * np.log(self.tau_gamma / self.sigma),
                self.rho,
                self.overlap,
            ]
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "tau_beta": self.tau_beta,
            "tau_gamma": self.tau_gamma,
            "sigma": self.sigma,
            "rho": self.rho,
            "overlap": self.overlap,
        }


@dataclass(frozen=True)
class SizeStats:
    """Sufficient statistics per measured size k of the effect columns before their scale
    (``members`` and ``2 * together``; at any overlap a size's columns are these times w(k) and
    w(k)^2), their Gram in blocks (members, members x pairs, pairs: each block scales alike),
    and the effect prior's ``features`` (None without one)."""

    ks: np.ndarray
    n: np.ndarray
    col_sum: np.ndarray
    gram_members: np.ndarray
    gram_cross: np.ndarray
    gram_pairs: np.ndarray
    xty: np.ndarray
    y_sum: np.ndarray
    yty: np.ndarray
    m: int
    features: np.ndarray | None = None

    @property
    def n_records(self) -> int:
        return int(self.n.sum())

    @property
    def flat(self) -> int:
        """Columns after the curve's with a flat prior: an effect prior's scales."""
        return 0 if self.features is None else self.features.shape[0]


def size_stats(members: np.ndarray, ce: np.ndarray, prior: EffectPrior | None = None) -> SizeStats:
    x = effect_design(members, overlap=0.0)
    k, m = members.sum(axis=1), members.shape[1]
    ks = np.unique(k)
    parts = [(x[k == size], ce[k == size]) for size in ks]
    grams = np.array([xs.T @ xs for xs, _ in parts])
    return SizeStats(
        ks=ks,
        n=np.array([y.size for _, y in parts]),
        col_sum=np.array([xs.sum(axis=0) for xs, _ in parts]),
        gram_members=np.ascontiguousarray(grams[:, :m, :m]),
        gram_cross=np.ascontiguousarray(grams[:, :m, m:]),
        gram_pairs=np.ascontiguousarray(grams[:, m:, m:]),
        xty=np.array([xs.T @ y for xs, y in parts]),
        y_sum=np.array([y.sum() for _, y in parts]),
        yty=np.array([y @ y for _, y in parts]),
        m=m,
        features=None if prior is None else prior.features,
    )


@dataclass(frozen=True)
class NormalEquations:
    """``Z'WZ``, ``Z'W ce``, ``ce'W ce`` and ``sum log w`` at one rho, overlap and curve; ``q``
    parameters lead with a flat prior (the curve's, then an effect prior's scales)."""

    ztwz: np.ndarray
    ztwy: np.ndarray
    ytwy: float
    sum_log_w: float
    n: int
    q: int
    m: int


def normal_equations(
    stats: SizeStats, curve: Curve, rho: float, overlap: float = 1.0
) -> NormalEquations:
    w = stats.ks.astype(float) ** rho
    member = member_weight(stats.ks, overlap)
    m = stats.m
    scale = np.ones_like(stats.col_sum) * member[:, None]
    scale[:, m:] *= member[:, None]  # a pair's columns scale by w(k)^2, a member's by w(k)
    phi = curve.basis(stats.ks)
    ff = phi.T @ (phi * (w * stats.n)[:, None])
    fx = phi.T @ (stats.col_sum * scale * w[:, None])
    # Per size the Gram's blocks scale by w^2 (members), w^3 (member x pair), w^4 (pairs).
    cross = np.tensordot(w * member**3, stats.gram_cross, axes=1)
    xx = np.block(
        [
            [np.tensordot(w * member**2, stats.gram_members, axes=1), cross],
            [cross.T, np.tensordot(w * member**4, stats.gram_pairs, axes=1)],
        ]
    )
    xy = (w[:, None] * scale * stats.xty).sum(axis=0)
    if stats.features is not None:
        # The prior's scales come first, each the combination ``features[c]`` of the columns.
        to_flat = stats.features
        fx = np.hstack([fx @ to_flat.T, fx])
        xx = np.block([[to_flat @ xx @ to_flat.T, to_flat @ xx], [xx @ to_flat.T, xx]])
        xy = np.concatenate([to_flat @ xy, xy])
    ztwz = np.block([[ff, fx], [fx.T, xx]])
    ztwy = np.concatenate([phi.T @ (w * stats.y_sum), xy])
    return NormalEquations(
        ztwz=ztwz,
        ztwy=ztwy,
        ytwy=float(w @ stats.yty),
        sum_log_w=float(np.log(w) @ stats.n),
        n=stats.n_records,
        q=curve.q + stats.flat,
        m=stats.m,
    )


def prior_precision(q: int, m: int, lam_beta: float, lam_gamma: float) -> np.ndarray:
    """Diagonal of the prior precision in units of 1/sigma^2 (zero: the flat curve part)."""
    n_pairs = m * (m - 1) // 2
    return np.concatenate([np.zeros(q), np.full(m, 1 / lam_beta), np.full(n_pairs, 1 / lam_gamma)])


@dataclass(frozen=True)
class Solution:
    """The posterior at given prior scales: mean, ``A`` factorised, sigma^2, log evidence."""

    theta: np.ndarray
    factor: tuple[np.ndarray, bool]
    sigma2: float
    log_evidence: float


def solve(eq: NormalEquations, lam_beta: float, lam_gamma: float) -> Solution:
    precision = prior_precision(eq.q, eq.m, lam_beta, lam_gamma)
    a = eq.ztwz + np.diag(precision)
    factor = cho_factor(a, lower=True)
    theta = cho_solve(factor, eq.ztwy)
    dof = eq.n - eq.q
    # A residual below the rounding of ce'W ce is zero: the floor keeps the logarithm finite.
    residual = max(eq.ytwy - theta @ eq.ztwy, np.finfo(float).eps * eq.ytwy)
    sigma2 = residual / dof
    n_pairs = eq.m * (eq.m - 1) // 2
    log_det_a = 2 * float(np.log(np.diag(factor[0])).sum())
    log_det_prior = eq.m * np.log(lam_beta) + n_pairs * np.log(lam_gamma)
    value = -0.5 * (dof * np.log(sigma2) - eq.sum_log_w + log_det_prior + log_det_a)
    return Solution(theta, factor, float(sigma2), float(value))


@dataclass(frozen=True)
class Choice:
    """The chosen prior scales, the curve they were chosen with, and its posterior."""

    hyper: Hyper
    curve: Curve
    equations: NormalEquations
    solution: Solution


def choose(
    stats: SizeStats,
    curve: Curve,
    start: np.ndarray | None = None,
    overlap: float | None = None,
) -> Choice:
    """Maximise the log evidence over (log lambda_beta, log lambda_gamma, rho, overlap) for one
    curve, from ``start`` or the best point of a small grid; ``overlap`` given: held there."""
    fixed = overlap is not None

    def negative(u: np.ndarray) -> float:
        eq = normal_equations(stats, curve, u[2], overlap if fixed else u[3])
        try:
            return -solve(eq, np.exp(u[0]), np.exp(u[1])).log_evidence
        except LinAlgError:
            # The flat part is identified apart from the effects only through their prior (an
            # effect prior's features are combinations of the effects' columns, the curve the
            # mean of beta's): at scales this loose A is singular to working precision, a point
            # the search leaves rather than the maximum.
            return np.inf

    axes = _START_GRID[:3] if fixed else _START_GRID
    if start is None:
        grid = np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T
        start = min(grid, key=negative)
    best = np.asarray(start, dtype=float)[: len(axes)]
    bounds = [_LOG_LAMBDA_BOUNDS, _LOG_LAMBDA_BOUNDS, _RHO_BOUNDS, _OVERLAP_BOUNDS][: len(axes)]
    # Nelder-Mead: finite-difference gradients of the evidence are too rough for L-BFGS-B here
    # (it stops on flat stretches), and four dimensions are cheap without them.
    found = minimize(negative, best, method="Nelder-Mead", bounds=bounds, options=_SIMPLEX_OPTIONS)
    u = found.x if found.fun <= negative(best) else best
    chosen_overlap = float(overlap if fixed else u[3])
    eq = normal_equations(stats, curve, u[2], chosen_overlap)
    solution = solve(eq, np.exp(u[0]), np.exp(u[1]))
    sigma = np.sqrt(solution.sigma2)
    hyper = Hyper(
        tau_beta=float(sigma * np.exp(u[0] / 2)),
        tau_gamma=float(sigma * np.exp(u[1] / 2)),
        sigma=float(sigma),
        rho=float(u[2]),
        overlap=chosen_overlap,
    )
    return Choice(hyper, curve, eq, solution)


def choose_overlap(stats: SizeStats, curve: Curve) -> Choice:
    """:func:`choose` with the overlap decided: 1, each member's 1/k of a merge that averages
    every member's vector, unless a free overlap has a Bayes factor of 3 or more over it (its
    evidence integrated over a uniform prior on [0, 1] at its best prior scales, which charges
    it for its freedom). TIES's disjoint mean passes (overlap 0.3 on the demo pool); on an
    average's merges a free overlap would only fit noise, at the cost of every effect's scale."""
    average = choose(stats, curve, overlap=1.0)
    free = choose(stats, curve)
    u = free.hyper.search_point()

    def evidence(overlap: float) -> float:
        eq = normal_equations(stats, curve, u[2], overlap)
        try:
            return solve(eq, np.exp(u[0]), np.exp(u[1])).log_evidence
        except LinAlgError:
            return -np.inf

    integrated = logsumexp([evidence(v) for v in _OVERLAP_GRID]) - np.log(_OVERLAP_GRID.size)
    gain = integrated - average.solution.log_evidence
    return free if gain > np.log(_OVERLAP_BAYES_FACTOR) else average


def choose_law(stats: SizeStats, free: Choice) -> Choice:
    """The per-size law's curve: b from :data:`LAW_B_GRID` by evidence at the prior scales and
    overlap of ``free``, the free curve's choice (they barely move with b), then the scales
    refitted at that b and overlap. The flat prior on (L_inf, A) is the same at every b, so the
    evidences compare."""
    ks = stats.ks.tolist()
    u = free.hyper.search_point()

    def evidence(b: float) -> float:
        eq = normal_equations(stats, Curve.law(ks, b), u[2], u[3])
        return solve(eq, np.exp(u[0]), np.exp(u[1])).log_evidence

    return choose(stats, Curve.law(ks, max(LAW_B_GRID, key=evidence)), u, free.hyper.overlap)
