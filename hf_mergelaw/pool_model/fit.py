"""Fitting the pool model to sweep records: prior scales by marginal likelihood, the posterior,
leave-one-out predictions.

Usage::

    report = fit_pools("results.jsonl", by=("method", "domain"))       # every group
    model = fit_pool(pool_records("results.jsonl")[0], curve="law")   # one group, f(k) a law
    report.save("pool.json")

Any design works (balanced, uniform, all, the paper's permutations, adaptive): the model only
needs every expert both in and out of some merges, merges at two or more sizes, and enough of
them (:func:`check_identifiable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular
from threadpoolctl import threadpool_limits

from .design import CURVES, Curve, CurveKind
from .errors import PoolModelError
from .evidence import Choice, choose, choose_law, choose_overlap, prior_precision, size_stats
from .model import FittedRecords, PoolModel
from .prior import EffectPrior, effect_columns
from .records import DEFAULT_BY, PoolRecords, pool_records
from .report import PoolReport

_LEVERAGE_EPS = 1e-9


def fit_pools(
    source: str | Path | Iterable[Mapping[str, Any]],
    *,
    by: Sequence[str] = DEFAULT_BY,
    curve: CurveKind = "free",
    level: float = 0.9,
    experts: Sequence[str] | None = None,
    priors: Mapping[str, EffectPrior] | None = None,
) -> PoolReport:
    """Fit a pool model to each group of a sweep's records (see :func:`fit_pool`); ``priors``:
    an effect prior per method label, used for each of its groups (as an adaptive sweep keeps
    them: :func:`.prior.kept_priors`); a prior over other experts is an error.

    Every group must be identifiable: one group that is not is an error naming it, and nothing
    is returned (or written) for the others.
    """
    groups = pool_records(source, by=by, experts=experts)
    priors = priors or {}
    pools = [
        fit_pool(g, curve=curve, level=level, prior=priors.get(str(g.group.get("method"))))
        for g in groups
    ]
    return PoolReport(pools=pools, by=tuple(by))


def fit_pool(
    records: PoolRecords,
    *,
    curve: CurveKind = "free",
    level: float = 0.9,
    prior: EffectPrior | None = None,
    overlap: float | None = None,
) -> PoolModel:
    """Fit one group's pool model.

    Args:
        records: one group's merges (:func:`~.records.pool_records`).
        curve: ``"free"``, a level of f(k) per measured size, or ``"law"``, the per-size law
            ``L_inf + A/(k + b)`` (it predicts sizes the records did not measure, flagged).
        level: coverage of the intervals the model reports by default.
        prior: features of the effects known before any merge (:mod:`.prior`, e.g. the experts'
            weight-space Gram): the effects are shrunk toward their fitted combination instead
            of toward zero, and ``source["prior"]`` records the fitted scales.
        overlap: how a member's weight falls with k (:func:`.design.member_weight`): None
            decides it by evidence (:func:`.evidence.choose_overlap`: 1, the average's 1/k,
            unless the merges say otherwise, as TIES's disjoint mean does), a number holds it.

    Raises:
        PoolModelError: records that cannot identify the model (see :func:`check_identifiable`),
            a prior over other experts.
    """
    if curve not in CURVES:
        raise PoolModelError(f"curve {curve!r}: use one of {', '.join(CURVES)}.")
    if not 0 < level < 1:
        raise PoolModelError(f"level {level}: an interval coverage lies in (0, 1), e.g. 0.9.")
    if prior is not None:
        prior.check_pool(records.experts, records.label())
    check_identifiable(records, curve, prior)
    # Many small factorisations: threaded BLAS only adds synchronisation, and on a loaded machine
    # a 2-thread OpenBLAS ran this 30-170x slower than one thread.
    with threadpool_limits(limits=1, user_api="blas"):
        stats = size_stats(records.members, records.ce, prior)
        free_curve = Curve.free(stats.ks.tolist())
        choice = (
            choose_overlap(stats, free_curve)
            if overlap is None
            else choose(stats, free_curve, overlap=overlap)
        )
        if curve == "law":
            choice = choose_law(stats, choice)
        return posterior(records, choice, level, prior)


def required_records(
    n_sizes: int, n_experts: int, curve: CurveKind = "free", features: int | None = None
) -> int:
    """Merges the model needs: a curve level per size (or the law's two), an effect per expert
    beyond their mean, and as many again to tell the interactions from a merge's misfit; with
    a prior of ``features`` features, their scales and a merge per expert (the prior predicts
    the interactions)."""
    q = n_sizes if curve == "free" else 2
    if features is not None:
        return q + features + n_experts
    return q + 2 * n_experts - 1


def check_identifiable(
    records: PoolRecords, curve: CurveKind = "free", prior: EffectPrior | None = None
) -> None:
    """Refuse records the model cannot be fitted to, saying what to merge."""
    label, m, k = records.label(), len(records.experts), records.k
    if m < 2:
        raise PoolModelError(
            f"{label}: the records merge only {records.experts[0]}; a pool model compares "
            "experts, so it needs at least two."
        )
    always = [
        name
        for name, column in zip(records.experts, records.members.T, strict=True)
        if column.all()
    ]
    if always:
        raise PoolModelError(
            f"{label}: {', '.join(always)} is in every merge, so its own effect cannot be told "
            "from f(k); merge some subsets without it."
        )
    sizes, counts = np.unique(k, return_counts=True)
    contrast = sizes[(counts >= 2) & (sizes < m)]
    if contrast.size < 2:
        shown = ", ".join(f"k={s} ({c} merges)" for s, c in zip(sizes, counts, strict=True))
        raise PoolModelError(
            f"{label}: merges of one size only ({shown}); an expert's own effect and its "
            "interactions separate only across sizes. Merge two or more subsets at another "
            "size as well (e.g. k = 2 and k = 4)."
        )
    needed = required_records(sizes.size, m, curve, None if prior is None else prior.size)
    if len(records) < needed:
        parts = (
            f"a curve level per size, an effect per expert and {m} more to tell interactions "
            "from misfit"
            if prior is None
            else f"a curve level per size, the prior's {prior.size} scales and an effect per expert"
        )
        raise PoolModelError(
            f"{label}: {len(records)} merges cannot identify a pool model of {m} experts at "
            f"{sizes.size} sizes: it needs at least {needed} ({parts}). Merge "
            f"{needed - len(records)} more subsets at the measured sizes (strategy: balanced)."
        )


def posterior(
    records: PoolRecords, choice: Choice, level: float, prior: EffectPrior | None = None
) -> PoolModel:
    """The posterior at the chosen prior scales, with every record's leave-one-out prediction;
    with an effect ``prior``, computed over its scales and the deviations, then folded into the
    effects (so the model's parameters are ``[curve, beta, gamma]`` whatever the prior)."""
    eq, solution, hyper, curve = choice.equations, choice.solution, choice.hyper, choice.curve
    lower = solution.factor[0]
    a_inv = solve_triangular(lower, np.eye(lower.shape[0]), lower=True)
    a_inv = a_inv.T @ a_inv
    covariance = solution.sigma2 * a_inv
    lam_beta = (hyper.tau_beta / hyper.sigma) ** 2
    lam_gamma = (hyper.tau_gamma / hyper.sigma) ** 2
    precision = prior_precision(eq.q, eq.m, lam_beta, lam_gamma)
    # Effective parameters: each shrunk direction counts for less than one.
    edf = a_inv.shape[0] - float(np.diag(a_inv) @ precision)
    dof = max(eq.n - edf, 1.0)
    z = np.hstack([curve.basis(records.k), effect_columns(records.members, prior, hyper.overlap)])
    fitted = z @ solution.theta
    w = records.k.astype(float) ** hyper.rho  # each record's weight in the fit
    leverage = w * np.sum((z @ a_inv) * z, axis=1)
    # Leave-one-out at fixed prior scales, in closed form (Sherman-Morrison). A record that
    # alone pins a parameter (the one merge of its size) has leverage 1: no prediction (NaN).
    alone = leverage > 1 - _LEVERAGE_EPS
    rest = np.where(alone, np.nan, 1 - leverage)
    loo_mean = records.ce - (records.ce - fitted) / rest
    loo_sd = np.sqrt(solution.sigma2 / (w * rest))
    theta, source = solution.theta, {"kind": "sweep"}
    if prior is not None:
        fold = prior.fold(curve.q)
        source["prior"] = prior.describe(theta[curve.q : curve.q + prior.size])
        theta, covariance = fold @ theta, fold @ covariance @ fold.T
    return PoolModel(
        group=dict(records.group),
        experts=records.experts,
        curve=curve,
        hyper=hyper,
        theta=theta,
        covariance=covariance,
        dof=dof,
        level=level,
        log_evidence=solution.log_evidence,
        records=FittedRecords(records.members, records.ce, fitted, loo_mean, loo_sd),
        source=source,
    )
