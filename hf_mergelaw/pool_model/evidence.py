"""How much to shrink: the prior scales chosen by marginal likelihood (empirical Bayes).

The model (see :mod:`.design`) is a Gaussian linear model::

    ce = Z theta + e,   e ~ N(0, sigma^2 k^-rho)          (misfit of one merge of size k)
    beta_i ~ N(0, tau_beta^2),  gamma_ij ~ N(0, tau_gamma^2),  curve part flat

(with an effect prior, :mod:`.prior`, beta and gamma are its features' flat-scaled sum plus
these deviations). Zero is the exchangeable model (every expert alike, every pair alike: the
pool's means of beta and gamma are absorbed by f(k)), so the priors shrink each expert's and
each pair's effect toward it by as much as the data say. ``tau_beta``, ``tau_gamma`` and ``rho``
maximise the integrated likelihood (the parameters integrated out, the flat part included,
``sigma`` profiled), never a hand-set constant. With ``lambda = tau^2 / sigma^2`` and
``A = Z'WZ + diag(0, 1/lambda)`` (q: the flat parameters):

    log p(ce) = -(n - q)/2 log sigma^2 + 1/2 sum log w - 1/2 log|Lambda| - 1/2 log|A| + const,
    sigma^2 = (ce'W ce - ce'WZ A^-1 Z'W ce) / (n - q)

Everything is computed from per-size sufficient statistics (:class:`SizeStats`): a design row's
curve part depends on k alone and so does its weight, so one evaluation costs one Cholesky
factorisation of a (q + M + P)-square matrix whatever the number of records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.optimize import minimize

from .design import Curve
from .prior import EffectPrior, effect_columns

# Search box of log(tau^2 / sigma^2) and of rho (noise falling as k^-rho, or growing a little).
_LOG_LAMBDA_BOUNDS = (-25.0, 25.0)
_RHO_BOUNDS = (-1.0, 3.0)
_START_GRID = ((-6.0, -2.0, 2.0, 6.0), (-6.0, -2.0, 2.0, 6.0), (0.0, 1.5))
_SIMPLEX_OPTIONS = {"xatol": 1e-2, "fatol": 1e-3, "maxiter": 2000}
# b values the per-size law's curve is tried at (b >= 0 as in the law; small b is the norm).
LAW_B_GRID = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)


@dataclass(frozen=True)
class Hyper:
    """Prior sd of an expert's effect and of a pair's, misfit sd of one merge at k = 1, and how
    the misfit variance falls with k (``sigma^2 k^-rho``)."""

    tau_beta: float
    tau_gamma: float
    sigma: float
    rho: float

    def noise_var(self, k: np.ndarray | int) -> np.ndarray:
        return self.sigma**2 * np.asarray(k, dtype=float) ** -self.rho

    def search_point(self) -> np.ndarray:
        """(log lambda_beta, log lambda_gamma, rho): where :func:`choose` searches."""
        return np.array(
            [
                2 * np.log(self.tau_beta / self.sigma),
                2 * np.log(self.tau_gamma / self.sigma),
                self.rho,
            ]
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "tau_beta": self.tau_beta,
            "tau_gamma": self.tau_gamma,
            "sigma": self.sigma,
            "rho": self.rho,
        }


@dataclass(frozen=True)
class SizeStats:
    """Sufficient statistics of the effect columns per measured size k."""

    ks: np.ndarray
    n: np.ndarray
    col_sum: np.ndarray
    gram: np.ndarray
    xty: np.ndarray
    y_sum: np.ndarray
    yty: np.ndarray
    m: int
    flat: int = 0  # leading columns of x with a flat prior (an effect prior's scales)

    @property
    def n_records(self) -> int:
        return int(self.n.sum())


def size_stats(members: np.ndarray, ce: np.ndarray, prior: EffectPrior | None = None) -> SizeStats:
    x = effect_columns(members, prior)
    k = members.sum(axis=1)
    ks = np.unique(k)
    parts = [(x[k == size], ce[k == size]) for size in ks]
    return SizeStats(
        ks=ks,
        n=np.array([y.size for _, y in parts]),
        col_sum=np.array([xs.sum(axis=0) for xs, _ in parts]),
        gram=np.array([xs.T @ xs for xs, _ in parts]),
        xty=np.array([xs.T @ y for xs, y in parts]),
        y_sum=np.array([y.sum() for _, y in parts]),
        yty=np.array([y @ y for _, y in parts]),
        m=members.shape[1],
        flat=0 if prior is None else prior.size,
    )


@dataclass(frozen=True)
class NormalEquations:
    """``Z'WZ``, ``Z'W ce``, ``ce'W ce`` and ``sum log w`` at one rho and one curve; ``q``
    parameters lead with a flat prior (the curve's, then an effect prior's scales)."""

    ztwz: np.ndarray
    ztwy: np.ndarray
    ytwy: float
    sum_log_w: float
    n: int
    q: int
    m: int


def normal_equations(stats: SizeStats, curve: Curve, rho: float) -> NormalEquations:
    w = stats.ks.astype(float) ** rho
    phi = curve.basis(stats.ks)
    ff = phi.T @ (phi * (w * stats.n)[:, None])
    fx = phi.T @ (stats.col_sum * w[:, None])
    xx = np.tensordot(w, stats.gram, axes=1)
    ztwz = np.block([[ff, fx], [fx.T, xx]])
    ztwy = np.concatenate([phi.T @ (w * stats.y_sum), w @ stats.xty])
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


def choose(stats: SizeStats, curve: Curve, start: np.ndarray | None = None) -> Choice:
    """Maximise the log evidence over (log lambda_beta, log lambda_gamma, rho) for one curve,
    from ``start`` or the best point of a small grid."""

    def negative(u: np.ndarray) -> float:
        eq = normal_equations(stats, curve, u[2])
        try:
            return -solve(eq, np.exp(u[0]), np.exp(u[1])).log_evidence
        except LinAlgError:
            # The flat part is identified apart from the effects only through their prior (an
            # effect prior's features are combinations of the effects' columns, the curve the
            # mean of beta's): at scales this loose A is singular to working precision, a point
            # the search leaves rather than the maximum.
            return np.inf

    if start is None:
        grid = np.array(np.meshgrid(*_START_GRID, indexing="ij")).reshape(3, -1).T
        start = min(grid, key=negative)
    best = np.asarray(start, dtype=float)
    bounds = [_LOG_LAMBDA_BOUNDS, _LOG_LAMBDA_BOUNDS, _RHO_BOUNDS]
    # Nelder-Mead: finite-difference gradients of the evidence are too rough for L-BFGS-B here
    # (it stops on flat stretches), and three dimensions are cheap without them.
    found = minimize(negative, best, method="Nelder-Mead", bounds=bounds, options=_SIMPLEX_OPTIONS)
    u = found.x if found.fun <= negative(best) else best
    eq = normal_equations(stats, curve, u[2])
    solution = solve(eq, np.exp(u[0]), np.exp(u[1]))
    sigma = np.sqrt(solution.sigma2)
    hyper = Hyper(
        tau_beta=float(sigma * np.exp(u[0] / 2)),
        tau_gamma=float(sigma * np.exp(u[1] / 2)),
        sigma=float(sigma),
        rho=float(u[2]),
    )
    return Choice(hyper, curve, eq, solution)


def choose_law(stats: SizeStats) -> Choice:
    """The per-size law's curve: b from :data:`LAW_B_GRID` by evidence at the free curve's prior
    scales (they barely move with b), then the scales refitted at that b. The flat prior on
    (L_inf, A) is the same at every b, so the evidences compare."""
    ks = stats.ks.tolist()
    u = choose(stats, Curve.free(ks)).hyper.search_point()

    def evidence(b: float) -> float:
        eq = normal_equations(stats, Curve.law(ks, b), u[2])
        return solve(eq, np.exp(u[0]), np.exp(u[1])).log_evidence

    return choose(stats, Curve.law(ks, max(LAW_B_GRID, key=evidence)), u)
