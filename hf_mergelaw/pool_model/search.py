"""The best subsets of one size: exact enumeration while C(M, k) is small, a search beyond.

Within a size the curve f(k) is a constant, so subsets rank by

    V(S) = w(k) sum_{i in S} beta_i + w(k)^2 sum_{i != j in S} gamma_ij     (w = 1/k at overlap 1)

a quadratic in the membership vector under a cardinality constraint (NP-hard in general). Up to
:data:`ENUMERATION_LIMIT` subsets are scored exhaustively; beyond, a best-improvement swap
search (replace one member by one non-member while V falls) runs from the greedy subset, the
best subsets of the neighbouring sizes, and seeded random starts, and the answer is the best
local optimum found. It is checked against enumeration on small pools with strong interactions
(tests/test_pool_model_search.py). Everything is batched over leading dimensions, so the same
code ranks the posterior mean and each posterior draw::

    members, values, method = best_subsets(beta, gamma, k=5, top=3, overlap=model.overlap)
    best, value = local_search(beta_draws, gamma_draws, starts)      # (D, M) each
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .design import effect_design, member_weight

ENUMERATION_LIMIT = 5000
# Random starts of the swap search: 24 missed a runner-up (never the best) on one of 114
# strongly interacting sizes whose members weigh more than 1/k; 48 found every one.
DEFAULT_RESTARTS = 48
# Swaps must lower V by more than this (nats) to count: rounding cannot make the search cycle.
_TOLERANCE = 1e-12


def all_members(m: int, k: int) -> np.ndarray:
    """Every k-subset of m experts as boolean rows, in lexicographic order."""
    index = np.array(list(itertools.combinations(range(m), k)), dtype=int).reshape(-1, k)
    rows = np.zeros((index.shape[0], m), dtype=bool)
    np.put_along_axis(rows, index, True, axis=1)
    return rows


def effect_values(effects: np.ndarray, members: np.ndarray, overlap: float = 1.0) -> np.ndarray:
    """V of each subset for effect vectors ``[beta, gamma pairs]``: (D, M + P), (n, M) -> (D, n)."""
    return np.atleast_2d(effects) @ effect_design(members, overlap).T


def values(
    beta: np.ndarray, gamma: np.ndarray, members: np.ndarray, overlap: float = 1.0
) -> np.ndarray:
    """V of batched subsets: ``beta`` (..., M), ``gamma`` (..., M, M), ``members`` (..., M)."""
    x = np.asarray(members, dtype=float)
    w = member_weight(x.sum(-1), overlap)
    return (beta * x).sum(-1) * w + np.einsum("...i,...ij,...j->...", x, gamma, x) * w**2


def greedy_path(beta: np.ndarray, gamma: np.ndarray, overlap: float = 1.0) -> np.ndarray:
    """(..., M) the order in which greedy adds experts: each step the one that makes the next
    size's V lowest (a size's f(k) does not change the choice)."""
    beta, gamma = np.asarray(beta, dtype=float), np.asarray(gamma, dtype=float)
    m = beta.shape[-1]
    x = np.zeros(beta.shape, dtype=float)
    order = np.zeros(beta.shape, dtype=int)
    for step in range(m):
        w = float(member_weight(step + 1, overlap))
        gain = beta * w + 2 * np.einsum("...ij,...j->...i", gamma, x) * w**2
        gain = np.where(x > 0, np.inf, gain)
        chosen = gain.argmin(-1)
        order[..., step] = chosen
        np.put_along_axis(x, chosen[..., None], 1.0, axis=-1)
    return order


def greedy_members(beta: np.ndarray, gamma: np.ndarray, k: int, overlap: float = 1.0) -> np.ndarray:
    """(..., M) the greedy subset of size k."""
    order = greedy_path(beta, gamma, overlap)[..., :k]
    members = np.zeros(np.shape(beta), dtype=bool)
    np.put_along_axis(members, order, True, axis=-1)
    return members


def local_search(
    beta: np.ndarray, gamma: np.ndarray, start: np.ndarray, overlap: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Best-improvement swaps from ``start`` until no swap lowers V; (members, V), batched.

    Swapping member i for non-member j changes V by
    ``u_j - u_i - 2 w^2 gamma_ij`` with ``u = w beta + 2 w^2 (gamma x)``.
    """
    beta, gamma = np.asarray(beta, dtype=float), np.asarray(gamma, dtype=float)
    x = np.array(start, dtype=float)
    w = member_weight(x.sum(-1), overlap)[..., None]
    active = np.ones(x.shape[:-1], dtype=bool)
    while active.any():
        xa, ga = x[active], gamma[active]
        wa = w[active]
        u = beta[active] * wa + 2 * np.einsum("nij,nj->ni", ga, xa) * wa**2
        delta = u[:, None, :] - u[:, :, None] - 2 * ga * wa[..., None] ** 2
        allowed = (xa[:, :, None] > 0) & (xa[:, None, :] == 0)
        delta = np.where(allowed, delta, np.inf).reshape(xa.shape[0], -1)
        best = delta.argmin(-1)
        improves = delta[np.arange(best.size), best] < -_TOLERANCE
        rows = np.flatnonzero(active)[improves]
        out, into = np.divmod(best[improves], x.shape[-1])
        x[rows, out] = 0.0
        x[rows, into] = 1.0
        active[np.flatnonzero(active)[~improves]] = False
    return x > 0, values(beta, gamma, x, overlap)


@dataclass(frozen=True)
class Ranked:
    """The best subsets of one size, best first, and how they were found."""

    members: np.ndarray
    values: np.ndarray
    method: str  # "enumeration" or "search"


def best_subsets(
    beta: np.ndarray,
    gamma: np.ndarray,
    k: int,
    *,
    top: int = 1,
    starts: np.ndarray | None = None,
    restarts: int = DEFAULT_RESTARTS,
    seed: int = 0,
    limit: int = ENUMERATION_LIMIT,
    overlap: float = 1.0,
) -> Ranked:
    """The ``top`` subsets of size k with the lowest V (one ``beta`` (M,), ``gamma`` (M, M)).

    Beyond ``limit`` subsets: the search from the greedy subset, ``starts`` (e.g. the best
    subsets of the neighbouring sizes grown or shrunk to k) and ``restarts`` random subsets;
    the runners-up are the best of the local optima and their one-swap neighbours.
    """
    m = beta.shape[-1]
    if math.comb(m, k) <= limit:
        members = all_members(m, k)
        scored = values(beta, gamma, members, overlap)
        order = np.argsort(scored, kind="stable")[:top]
        return Ranked(members[order], scored[order], "enumeration")
    rng = np.random.default_rng(seed)
    random_starts = np.argsort(rng.random((restarts, m)), axis=1)[:, :k]
    chosen = np.zeros((restarts, m), dtype=bool)
    np.put_along_axis(chosen, random_starts, True, axis=1)
    pool = [greedy_members(beta, gamma, k, overlap)[None], chosen]
    if starts is not None:
        pool.append(np.asarray(starts, dtype=bool).reshape(-1, m))
    start = np.concatenate(pool)
    n = start.shape[0]
    found, _ = local_search(
        np.broadcast_to(beta, (n, m)), np.broadcast_to(gamma, (n, m, m)), start, overlap
    )
    # Runners-up: grow the list by the one-swap neighbours of its best until they add nothing.
    candidates, leaders = np.unique(found, axis=0), None
    while True:
        scored = values(beta, gamma, candidates, overlap)
        order = np.argsort(scored, kind="stable")[:top]
        if leaders is not None and np.array_equal(candidates[order], leaders):
            return Ranked(candidates[order], scored[order], "search")
        leaders = candidates[order]
        candidates = np.unique(np.concatenate([candidates, *map(_one_swap, leaders)]), axis=0)


def _one_swap(members: np.ndarray) -> np.ndarray:
    """Every subset one swap away from ``members`` (M,)."""
    inside, outside = np.flatnonzero(members), np.flatnonzero(~members)
    out = np.repeat(members[None], inside.size * outside.size, axis=0)
    i, j = np.meshgrid(inside, outside, indexing="ij")
    rows = np.arange(out.shape[0])
    out[rows, i.ravel()] = False
    out[rows, j.ravel()] = True
    return out
