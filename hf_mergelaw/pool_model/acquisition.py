"""Which subsets to merge next: those that most reduce the uncertainty of the answers.

This is what an adaptive sweep calls between rounds. In the Gaussian linear model the posterior
covariance after merging a subset with design row z does not depend on what the merge measures
(prior scales held fixed):

    Sigma' = Sigma - Sigma z z' Sigma / (z' Sigma z + s^2(k))     s^2(k): one merge's misfit

so a target ``t' theta`` loses ``(t' Sigma z)^2 / (z' Sigma z + s^2)`` of its variance. A batch is
picked greedily, each pick updating Sigma before the next, so a batch spreads over the questions
instead of piling onto one (exact for fixed prior scales; refit between rounds to update them).

Default targets, "what the user asked": the pool curve E[L | k] at each size, and at each size the
contrasts between the best subset and its runners-up, which decide the best-subset answer and its
``p_best``. A target's reduction counts relative to its variance before the batch, so targets on
different scales weigh alike. :func:`prediction_targets` asks for subsets' own predictions
instead (their deviations from their size's mean, what the held-out R^2 scores). Added to the
default in an adaptive sweep they did not pay on the demo pool (20 replays each, every member at
1/k; ties_fused at 28 merges without a prior: held-out R^2 0.892 -> 0.899; average at 20 with
the curvature prior: R^2 0.9935 -> 0.9928, interval coverage 0.94 -> 0.97), so the default
leaves them out::

    picks = next_subsets(model, 8)                  # a round of 8 merges
    [(p.subset, p.score) for p in picks]
    next_subsets(model, 4, candidates=members, targets=rows)   # your own candidates and questions
    next_subsets(model, 4, targets=prediction_targets(model, candidate_subsets(model)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .design import split
from .errors import PoolModelError
from .expectation import mean_row
from .model import PoolModel
from .search import all_members, best_subsets

DEFAULT_TOP = 5
# Sizes with more subsets than this offer a seeded sample of them (plus the best's neighbours).
CANDIDATES_PER_SIZE = 500


@dataclass(frozen=True)
class Pick:
    """A subset to merge next and its score: the summed fraction of each target's variance its
    merge removes, after the batch's earlier picks."""

    subset: tuple[str, ...]
    k: int
    score: float


def answer_targets(model: PoolModel, top: int = DEFAULT_TOP) -> np.ndarray:
    """(T, len(theta)) rows: E[L | k] at every size the curve covers, and best-minus-runner-up
    contrasts of the ``top`` subsets of each size."""
    _, beta, gamma = split(model.theta, model.curve.q, model.m)
    sizes = [k for k in range(1, model.m + 1) if model.curve.covers(k)]
    rows = [mean_row(model, k) for k in sizes]
    for k in sizes:
        if math.comb(model.m, k) < 2:
            continue
        ranked = best_subsets(beta, gamma, k, top=top, overlap=model.overlap).members
        z = model.rows(ranked)
        rows += list(z[0] - z[1:])
    return np.array(rows)


def prediction_targets(model: PoolModel, members: np.ndarray) -> np.ndarray:
    """(len(members), len(theta)) rows: each subset's predicted CE minus its size's pool mean,
    the within-size deviation the model's R^2 measures."""
    members = np.asarray(members, dtype=bool)
    sizes, size_of = np.unique(members.sum(axis=1), return_inverse=True)
    means = np.array([mean_row(model, int(k)) for k in sizes]).reshape(-1, model.theta.size)
    return model.rows(members) - means[size_of]


def candidate_subsets(model: PoolModel, seed: int = 0) -> np.ndarray:
    """Subsets not yet merged at the sizes the curve covers: all of a size while it has at
    most :data:`CANDIDATES_PER_SIZE`, else a seeded sample of that many."""
    rng = np.random.default_rng(seed)
    merged = {row.tobytes() for row in model.records.members}
    out = []
    for k in range(1, model.m + 1):
        if not model.curve.covers(k):
            continue
        if math.comb(model.m, k) <= CANDIDATES_PER_SIZE:
            rows = all_members(model.m, k)
        else:
            order = np.argsort(rng.random((CANDIDATES_PER_SIZE, model.m)), axis=1)[:, :k]
            rows = np.zeros((CANDIDATES_PER_SIZE, model.m), dtype=bool)
            np.put_along_axis(rows, order, True, axis=1)
            rows = np.unique(rows, axis=0)
        out += [row for row in rows if row.tobytes() not in merged]
    return np.array(out, dtype=bool).reshape(-1, model.m)


def next_subsets(
    model: PoolModel,
    count: int,
    *,
    candidates: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    seed: int = 0,
) -> list[Pick]:
    """The ``count`` subsets (a round) that most reduce the targets' uncertainty, in the order
    picked: each the best given the earlier picks (a later pick can score a little higher than
    an earlier one; variance reduction is not submodular).

    Args:
        candidates: boolean rows over ``model.experts`` (default :func:`candidate_subsets`).
        targets: rows of functionals of theta (default :func:`answer_targets`).
        seed: seed of the candidate sample on large pools.

    Raises:
        PoolModelError: no candidate left to merge, or a size a free curve did not measure.
    """
    candidates = candidate_subsets(model, seed) if candidates is None else np.asarray(candidates)
    if candidates.shape[0] == 0:
        raise PoolModelError(
            f"{model.label()}: every subset at the measured sizes is merged already; nothing "
            "is left to choose."
        )
    targets = answer_targets(model) if targets is None else np.atleast_2d(targets)
    z = model.rows(candidates)
    noise = model.hyper.noise_var(candidates.sum(axis=1))
    before = np.sum((targets @ model.covariance) * targets, axis=1)
    weight = 1.0 / np.where(before > 0, before, np.inf)
    # A candidate removes z' Sigma B Sigma z / (z' Sigma z + s^2) of the weighted targets'
    # variance, B = T' diag(weight) T: a (d, d) matrix instead of a (targets, candidates) one,
    # which with every candidate's prediction a target would not fit in memory on large pools.
    b = (targets * weight[:, None]).T @ targets
    sigma_z = model.covariance @ z.T  # (d, n)
    removed = np.sum(sigma_z * (b @ sigma_z), axis=0)
    z_sigma_z = np.sum(z.T * sigma_z, axis=0)
    available = np.ones(candidates.shape[0], dtype=bool)
    picks = []
    for _ in range(min(count, candidates.shape[0])):
        denominator = z_sigma_z + noise
        score = np.where(available, removed / denominator, -np.inf)
        best = int(score.argmax())
        picks.append(
            Pick(
                subset=tuple(np.asarray(model.experts)[candidates[best]]),
                k=int(candidates[best].sum()),
                score=float(score[best]),
            )
        )
        available[best] = False
        # Rank-one update of Sigma, applied to the products kept for every candidate.
        u = sigma_z[:, best].copy()
        b_u = b @ u
        shift = (z @ u) / denominator[best]
        removed += shift**2 * (u @ b_u) - 2 * shift * (sigma_z.T @ b_u)
        sigma_z -= np.outer(u, shift)
        z_sigma_z -= shift**2 * denominator[best]
    return picks
