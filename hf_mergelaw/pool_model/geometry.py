"""The pool model from the pool's geometry: every subset's loss with no merge, then a few merges.

Around the base, the loss of a merge ``theta_S = theta_0 + (1/k) sum_{i in S} u_i`` is, to second
order in the vectors ``u_i`` each expert adds (docs/law.md section 3),

    L(S) ~ L0 + (1/k) sum_{i in S} g_i + (1/(2 k^2)) sum_{i, j in S} Q_ij,
    g_i = grad L(theta_0) . u_i,   Q_ij = u_i' H u_j

which is the pool model's form exactly: ``f(k) = L0``, ``beta_i = g_i + Q_ii / 2`` and
``gamma_ij = (Q_ij - (Q_ii + Q_jj) / 2) / 2`` (the diagonal's 1/k^2 term is ``beta``'s 1/k term
less ``gamma``'s (k - 1)/k^2 share of it). So ``pool predict``, ``select`` and ``pool_curve`` work
on a geometry model unchanged::

    prior = geometry_model({"method": "average", "domain": "macro"}, geometry)   # no merge
    model = calibrate(prior, records)                  # a few measured merges fix the level
    model.source["calibration"]                        # how far they moved it, held-out error

The expansion ignores everything beyond second order in the task vectors (for TIES and DARE-TIES
also the sign election, which depends on the subset), so a geometry model alone has no interval:
its ranking and shape are what it is for. ``calibrate`` fits the part it misses, a level
``L_inf + A/(k + b)`` and shrunk corrections of ``beta`` and ``gamma``, to measured merges with the
geometry as the prior mean; its intervals are the calibrated fit's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..subsets import sample_subsets
from .design import Curve, pairs
from .errors import PoolModelError
from .evidence import Hyper, choose, choose_law, size_stats
from .expectation import mean_row
from .fit import posterior
from .model import FittedRecords, PoolModel
from .prior import EffectPrior, unit_scale
from .records import PoolRecords

# The features of a geometry's effect prior (:meth:`PoolGeometry.effect_prior`).
GEOMETRY_FEATURES = ("beta ~ g_i + Q_ii / 2", "gamma ~ (Q_ij - (Q_ii + Q_jj) / 2) / 2")
CONSENSUS_NOTE = ", and the sign election, which depends on the subset"
# Singles whose measured change from the base the expansion misses by more than this share are
# out of its regime.
REGIME_TOLERANCE = 0.5
# Extra coverage shortfall of the calibration merges' leave-one-out intervals that is warned of.
COVERAGE_SLACK = 0.15


@dataclass(frozen=True)
class PoolGeometry:
    """One group's second-order terms: base loss ``loss``, ``gradient[i] = g_i`` and
    ``curvature[i, j] = Q_ij`` over ``experts`` (sorted names, as pool records sort them)."""

    experts: tuple[str, ...]
    loss: float
    gradient: np.ndarray
    curvature: np.ndarray

    def __post_init__(self) -> None:
        m = len(self.experts)
        if np.shape(self.gradient) != (m,) or np.shape(self.curvature) != (m, m):
            raise PoolModelError(
                f"geometry of {m} experts needs a gradient of shape ({m},) and a curvature of "
                f"({m}, {m}); got {np.shape(self.gradient)} and {np.shape(self.curvature)}."
            )

    @classmethod
    def mean(cls, parts: Sequence[PoolGeometry]) -> PoolGeometry:
        """The terms of the mean of several losses (the cross-domain macro mean of domains)."""
        return cls(
            parts[0].experts,
            float(np.mean([p.loss for p in parts])),
            np.mean([p.gradient for p in parts], axis=0),
            np.mean([p.curvature for p in parts], axis=0),
        )

    def predict(self, members: np.ndarray) -> np.ndarray:
        """The second-order loss of each subset (boolean rows over ``experts``)."""
        members = np.asarray(members, dtype=float)
        k = members.sum(axis=1)
        quadratic = np.einsum("ni,ij,nj->n", members, self.curvature, members)
        return self.loss + members @ self.gradient / k + quadratic / (2 * k**2)

    def effects(self) -> tuple[np.ndarray, np.ndarray]:
        """``beta`` (M,) and ``gamma`` pairs (P,) of the pool model that equals :meth:`predict`."""
        q = 0.5 * (self.curvature + self.curvature.T)
        half_diagonal = np.diag(q) / 2
        i, j = pairs(len(self.experts))
        return self.gradient + half_diagonal, (q[i, j] - half_diagonal[i] - half_diagonal[j]) / 2

    def effect_prior(self) -> EffectPrior:
        """The second-order effects as a pool model's prior: ``beta`` and ``gamma`` each
        shrunk toward its scaled prediction, the two scales fitted (the expansion's level and
        misfit are the merges' to say, as in :func:`calibrate`)."""
        beta, gamma = self.effects()
        features = np.zeros((2, beta.size + gamma.size))
        features[0, : beta.size] = beta / unit_scale(beta)
        features[1, beta.size :] = gamma / unit_scale(gamma)
        return EffectPrior(self.experts, features, GEOMETRY_FEATURES, "curvature")


def geometry_model(
    group: Mapping[str, Any],
    geometry: PoolGeometry,
    *,
    curvature: str = "hessian",
    curvature_sample: float = 1.0,
    approximate: bool = False,
    level: float = 0.9,
) -> PoolModel:
    """The pool model of the second-order expansion alone (no merge, no interval).

    ``approximate``: the method's merge is not a sum of fixed per-expert vectors (sign
    election), so the expansion holds only approximately even to second order.
    ``curvature`` and ``curvature_sample`` say how ``geometry`` was measured (for the record).
    """
    m = len(geometry.experts)
    beta, gamma = geometry.effects()
    return PoolModel(
        group=dict(group),
        experts=geometry.experts,
        curve=Curve.law(range(1, m + 1), 0.0),
        # No misfit and no parameter uncertainty is known before a merge is measured: sigma is
        # NaN so every interval reads "unknown" rather than a false zero width.
        hyper=Hyper(tau_beta=0.0, tau_gamma=0.0, sigma=float("nan"), rho=0.0),
        theta=np.concatenate([[geometry.loss, 0.0], beta, gamma]),
        covariance=np.zeros((2 + beta.size + gamma.size,) * 2),
        dof=float("inf"),
        level=level,
        log_evidence=float("nan"),
        records=FittedRecords(np.zeros((0, m), dtype=bool), *(np.zeros(0),) * 4),
        source={
            "kind": "geometry",
            "curvature": curvature,
            "curvature_sample": curvature_sample,
            "approximate": approximate,
            "note": second_order_note(approximate, calibrated=False),
            "calibration": None,
            "warnings": [],
        },
    )


def second_order_note(approximate: bool, *, calibrated: bool) -> str:
    """What a geometry model's answers ignore, and whether merges calibrated it."""
    ignored = "terms beyond second order in the task vectors" + (
        CONSENSUS_NOTE if approximate else ""
    )
    status = (
        "calibrated on measured merges"
        if calibrated
        else "no interval without calibration merges (--calibrate)"
    )
    return (
        f"second-order prediction from the loss's gradient and curvature at the base: it "
        f"ignores {ignored}; {status}"
    )


def calibration_sizes(m: int) -> list[int]:
    """The sizes calibration merges take after every expert alone, in the order they are
    filled: the full pool, pairs, half-pool merges."""
    return [k for k in dict.fromkeys((m, 2, (m + 1) // 2)) if 1 < k <= m]


def calibration_subsets(experts: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, ...]]:
    """The ``n`` subsets a geometry model is calibrated on: every expert alone first (an
    expert alone needs no merge), then the full pool, then pairs and half-pool merges in turn,
    each size's drawn with every expert in equally many.

    Raises:
        PoolModelError: ``n`` below M + 2 (the level is measured at three sizes at least: at
            two, its intervals covered a third of the subsets on the demo pool) or above what
            the calibration sizes hold.
    """
    m = len(experts)
    sizes = calibration_sizes(m)
    if n < m + 2:
        raise PoolModelError(
            f"--calibrate {n}: calibrating needs the {m} experts alone and merges of two other "
            f"sizes (the full pool and a pair), so at least {m + 2} subsets (or 0 for the "
            "geometry alone)."
        )
    available = m + sum(math.comb(m, k) for k in sizes)
    if n > available:
        raise PoolModelError(
            f"--calibrate {n}: the calibration sizes (1, {', '.join(map(str, sizes))}) of {m} "
            f"experts hold {available} subsets; give at most that, or fit a sweep's records "
            "with `hf-mergelaw pool fit`."
        )
    per_size = {k: 0 for k in sizes}
    extra, turn = n - m, 0
    while extra:
        k = sizes[turn % len(sizes)]
        if per_size[k] < math.comb(m, k):
            per_size[k] += 1
            extra -= 1
        turn += 1
    chosen = [(name,) for name in experts]
    for k, count in per_size.items():
        if count:
            drawn = sample_subsets(m, k, strategy="balanced", per_k=count, seed=seed)
            chosen += [tuple(experts[i] for i in subset) for subset in drawn]
    return chosen


def calibrate(prior: PoolModel, records: PoolRecords, level: float | None = None) -> PoolModel:
    """The geometry model ``prior`` corrected by measured merges ``records`` of its group.

    The part the expansion misses, ``ce - prior``, is fitted as a pool model of its own: a level
    ``L_inf + A/(k + b)`` (any size, so every k stays predicted) with ``beta`` and ``gamma``
    corrections shrunk toward zero by marginal likelihood; the result is their sum, with the
    correction's intervals. ``source["calibration"]`` says how far the merges moved the
    prediction per size and how well each merge is predicted with it left out; warnings say
    when the merges put the pool outside the expansion's regime.

    Raises:
        PoolModelError: records of other experts, or of fewer than two sizes.
    """
    if tuple(records.experts) != prior.experts:
        raise PoolModelError(
            f"calibration merges of {', '.join(records.experts)} cannot calibrate the geometry "
            f"of {', '.join(prior.experts)}; measure subsets of the same pool."
        )
    sizes = np.unique(records.k)
    if sizes.size < 2:
        raise PoolModelError(
            f"{prior.label()}: calibration merges of one size (k = {sizes[0]}) cannot tell a "
            "level from its change with k; add merges of other sizes."
        )
    level = prior.level if level is None else level
    expected = prior.predict(records.members).mean
    residual = replace(records, ce=records.ce - expected)
    # The correction adds to the expansion's parameters, so it weighs members as the expansion.
    stats = size_stats(records.members, residual.ce)
    free = choose(stats, Curve.free(stats.ks.tolist()), overlap=prior.overlap)
    correction = posterior(residual, choose_law(stats, free), level)
    fitted = correction.records
    model = replace(
        correction,
        # Both are [L_inf, A, beta, gamma]: the prior's level is flat (A = 0), so the sum is the
        # corrected model at the correction's b.
        curve=Curve.law(range(1, prior.m + 1), correction.curve.b),
        theta=prior.theta + correction.theta,
        records=FittedRecords(
            records.members,
            records.ce,
            fitted.fitted + expected,
            fitted.loo_mean + expected,
            fitted.loo_sd,
        ),
    )
    summary = _calibration_summary(model, prior, records, expected)
    return replace(
        model,
        source={
            **prior.source,
            "note": second_order_note(prior.source["approximate"], calibrated=True),
            "calibration": summary,
            "warnings": _warnings(model, prior, records, expected, summary),
        },
    )


def _calibration_summary(
    model: PoolModel, prior: PoolModel, records: PoolRecords, expected: np.ndarray
) -> dict[str, Any]:
    loo = model.records
    ok = np.isfinite(loo.loo_mean)
    t = model.t_value()
    inside = np.abs(loo.ce - loo.loo_mean) <= t * loo.loo_sd
    k = records.k
    calibrated = model.predict(records.members).mean
    return {
        "merges": len(records),
        "sizes": sorted({int(size) for size in k}),
        # Mean measured minus second-order prediction per size: what the level correction
        # learned; "moved" is how far the calibrated prediction moved from the geometry's.
        "shift": {
            str(size): float(np.mean(records.ce[k == size] - expected[k == size]))
            for size in np.unique(k)
        },
        "moved": {
            str(size): float(model.linear(mean_row(model, size))[0][0])
            - float(prior.linear(mean_row(prior, size))[0][0])
            for size in range(1, prior.m + 1)
        },
        "prior_rmse": float(np.sqrt(np.mean((records.ce - expected) ** 2))),
        "fitted_rmse": float(np.sqrt(np.mean((records.ce - calibrated) ** 2))),
        "loo_rmse": float(np.sqrt(np.mean((loo.ce[ok] - loo.loo_mean[ok]) ** 2)))
        if ok.any()
        else float("nan"),
        "loo_coverage": float(np.mean(inside[ok])) if ok.any() else float("nan"),
        "loo_records": int(ok.sum()),
    }


def _warnings(
    model: PoolModel,
    prior: PoolModel,
    records: PoolRecords,
    expected: np.ndarray,
    summary: Mapping[str, Any],
) -> list[str]:
    out = []
    singles = records.k == 1
    base = prior.theta[0]
    if singles.any():
        change = records.ce[singles] - base
        missed = np.abs(records.ce[singles] - expected[singles]) / np.maximum(
            np.abs(change), np.finfo(float).eps
        )
        if np.median(missed) > REGIME_TOLERANCE:
            out.append(
                f"{prior.label()}: the second-order expansion misses the experts' own change "
                f"from the base by a median {np.median(missed):.0%} of it: the task vectors are "
                "too large for its regime, so the answers rest on the calibration merges "
                "(calibrate with more, or fit a sweep)."
            )
    covered = summary["loo_coverage"]
    if np.isfinite(covered) and covered < model.level - COVERAGE_SLACK:
        out.append(
            f"{prior.label()}: only {covered:.0%} of the calibration merges fall in their "
            f"{model.level:.0%} interval when left out: the measurements disagree with the "
            "second-order prediction beyond what the calibration models; trust its intervals "
            "less, and merge more subsets (or fit a sweep)."
        )
    return out
