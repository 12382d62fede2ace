"""Which experts to merge: the best subsets of each size and overall, the probability that each
is the best, and the greedy order in which to add experts.

What merging a subset gives is known for the subsets already merged (their measured CE: a merge
is deterministic, so its misfit is part of it) and predicted for the others (the model's mean).
Subsets rank by that; a merged subset's ``mean``, ``lo`` and ``hi`` are its measured CE.

``p_best`` is the share of posterior draws of (f, beta, gamma) in which the subset is the best of
its size (or, for ``scope="overall"``, of every size considered), the merged subsets at their
measured CE: the uncertainty of the model's parameters. The misfit a merge of an unmerged subset
will show is in its interval, not in ``p_best``. Beyond exact enumeration each draw's best is
searched from the reported subsets and the draw's greedy subset, so there ``p_best`` is an upper
bound (a draw's better subset elsewhere may be missed). A geometry model no merge calibrated has
no posterior spread to draw from: its ``p_best``, like its intervals, is NaN (unknown)::

    for s in select(model, top=3):            # every size the curve covers, and overall
        s.k, s.rank, s.subset, s.mean, s.lo, s.hi, s.p_best, s.merged
    greedy_order(model).order                  # ("code", "math", ...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .design import pairs, split
from .errors import PoolModelError
from .model import PoolModel
from .search import (
    ENUMERATION_LIMIT,
    all_members,
    best_subsets,
    effect_values,
    greedy_members,
    local_search,
    values,
)

DEFAULT_DRAWS = 1000
_CHUNK = 1024  # subsets scored per block when every draw enumerates a size


@dataclass(frozen=True)
class Selection:
    """One ranked subset: the CE merging it gives (measured, or predicted with an interval)
    and p_best."""

    group: dict[str, Any]
    scope: str  # "size": ranked among its size; "overall": among every size considered
    k: int
    rank: int
    subset: tuple[str, ...]
    mean: float
    lo: float
    hi: float
    p_best: float
    merged: bool  # measured in the records: mean = lo = hi = its CE
    method: str  # how its size was ranked: "enumeration" or "search"
    extrapolated: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "subset": list(self.subset)}


@dataclass(frozen=True)
class _Known:
    """The merged subsets of one size and their measured CEs."""

    members: np.ndarray
    ce: np.ndarray

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Each row's measured CE, NaN where it was not merged."""
        table = {row.tobytes(): ce for row, ce in zip(self.members, self.ce, strict=True)}
        return np.array([table.get(row.tobytes(), np.nan) for row in rows])


@dataclass(frozen=True)
class _SizeRanking:
    members: np.ndarray
    totals: np.ndarray  # measured CE where merged, else the model's mean
    method: str


def select(
    model: PoolModel,
    k: int | Sequence[int] | None = None,
    *,
    top: int = 1,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    level: float | None = None,
    limit: int = ENUMERATION_LIMIT,
) -> list[Selection]:
    """The ``top`` subsets of each size in ``k`` (default: every size the curve covers, and
    overall across them), best first. Sizes of at most ``limit`` subsets are enumerated (the
    point estimate and every draw), larger ones searched.

    Raises:
        PoolModelError: a size outside 1..M, or one a free curve did not measure.
    """
    sizes = _sizes(model, k)
    if top < 1 or draws < 1:
        raise PoolModelError(f"top={top}, draws={draws}: give whole numbers >= 1.")
    samples = model.draws(draws, seed)
    f_draws, beta_draws, gamma_draws = split(samples, model.curve.q, model.m)
    f_hat, beta, gamma = split(model.theta, model.curve.q, model.m)
    out: list[Selection] = []
    totals, bests, leaders = [], [], []
    previous = None
    for size in sizes:
        basis = model.curve.basis(np.array([size]))[0]
        here = model.records.k == size
        known = _Known(model.records.members[here], model.records.ce[here])
        starts = None if previous is None or size != previous.sum() + 1 else _grown(previous)
        ranking = _rank_size(
            model, beta, gamma, float(basis @ f_hat), size, known, top, starts, seed, limit
        )
        previous = ranking.members[0]
        best, total = _draw_bests(
            model, beta_draws, gamma_draws, f_draws @ basis, size, known, ranking, limit
        )
        totals.append(total)
        bests.append(best)
        p_best = _share_best(model, best, ranking.members)
        rows = _rows(model, "size", ranking, known, p_best, level)
        leaders.append(rows)
        out += rows
    if k is None and len(sizes) > 1:
        out += _overall(model, leaders, np.array(totals), np.array(bests), top)
    return out


def _share_best(model: PoolModel, bests: np.ndarray, members: np.ndarray) -> list[float]:
    """Each row's share of the draws' bests (NaN where the model has no uncertainty to draw)."""
    if not model.has_intervals:
        return [float("nan")] * len(members)
    return [float(np.mean((bests == row).all(-1))) for row in members]


def _sizes(model: PoolModel, k: int | Sequence[int] | None) -> list[int]:
    if k is None:
        return [size for size in range(1, model.m + 1) if model.curve.covers(size)]
    sizes = sorted({int(k)} if isinstance(k, int | np.integer) else {int(v) for v in k})
    outside = [size for size in sizes if not 1 <= size <= model.m]
    if outside:
        raise PoolModelError(
            f"k = {', '.join(map(str, outside))}: {model.label()} has {model.m} experts, so a "
            f"subset has 1 to {model.m}."
        )
    model.curve.basis(np.array(sizes))  # a free curve refuses sizes it did not measure
    return sizes


def _grown(members: np.ndarray) -> np.ndarray:
    """The subsets one larger than ``members``: search starts for the next size."""
    outside = np.flatnonzero(~members)
    grown = np.repeat(members[None], outside.size, axis=0)
    grown[np.arange(outside.size), outside] = True
    return grown


def _rank_size(
    model: PoolModel,
    beta: np.ndarray,
    gamma: np.ndarray,
    level: float,
    k: int,
    known: _Known,
    top: int,
    starts: np.ndarray | None,
    seed: int,
    limit: int,
) -> _SizeRanking:
    """The ``top`` subsets of size k by measured CE where merged, the model's mean elsewhere.

    Beyond enumeration the search is asked for more subsets until ``top`` unmerged ones are
    among them (merged ones may rank lower than the model says), and the merged subsets of the
    size join the candidates."""
    m = beta.shape[-1]
    wanted = math.comb(m, k) if math.comb(m, k) <= limit else top
    while True:
        found = best_subsets(
            beta,
            gamma,
            k,
            top=wanted,
            starts=starts,
            seed=seed,
            limit=limit,
            overlap=model.overlap,
        )
        unmerged = int(np.isnan(known.lookup(found.members)).sum())
        if found.method == "enumeration" or unmerged >= top or wanted >= top + len(known.ce):
            break
        wanted = min(2 * wanted, top + len(known.ce))
    candidates = np.unique(np.concatenate([found.members, known.members]), axis=0)
    model_total = level + values(beta, gamma, candidates, model.overlap)
    measured = known.lookup(candidates)
    totals = np.where(np.isnan(measured), model_total, measured)
    order = np.argsort(totals, kind="stable")[:top]
    return _SizeRanking(candidates[order], totals[order], found.method)


def _draw_bests(
    model: PoolModel,
    beta: np.ndarray,
    gamma: np.ndarray,
    level: np.ndarray,
    k: int,
    known: _Known,
    ranking: _SizeRanking,
    limit: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each draw's best subset of size k and its CE (``level``: each draw's f(k)), merged
    subsets at their measured CE: exact while C(M, k) <= ``limit``, else the best of swap
    searches from the ranked subsets and the draw's greedy subset, and of the merged subsets."""
    d, m = beta.shape
    if math.comb(m, k) <= limit:
        i, j = pairs(m)
        effects = np.concatenate([beta, gamma[:, i, j]], axis=1)
        subsets = all_members(m, k)
        measured = known.lookup(subsets)
        best_value = np.full(d, np.inf)
        best_index = np.zeros(d, dtype=int)
        for start in range(0, subsets.shape[0], _CHUNK):
            block = slice(start, start + _CHUNK)
            scored = level[:, None] + effect_values(effects, subsets[block], model.overlap)
            scored = np.where(np.isnan(measured[block]), scored, measured[block])
            index = scored.argmin(axis=1)
            value = scored[np.arange(d), index]
            better = value < best_value
            best_value[better] = value[better]
            best_index[better] = start + index[better]
        return subsets[best_index], best_value
    starts = np.concatenate(
        [
            np.broadcast_to(ranking.members, (d, *ranking.members.shape)),
            greedy_members(beta, gamma, k, model.overlap)[:, None],
        ],
        axis=1,
    )
    n = starts.shape[1]
    found, value = local_search(
        np.repeat(beta, n, axis=0),
        np.repeat(gamma, n, axis=0),
        starts.reshape(d * n, m),
        model.overlap,
    )
    measured = known.lookup(found)
    total = np.where(np.isnan(measured), np.repeat(level, n) + value, measured).reshape(d, n)
    found = found.reshape(d, n, m)
    choice = total.argmin(axis=1)
    best, best_total = found[np.arange(d), choice], total[np.arange(d), choice]
    if len(known.ce):
        # A merged subset's CE is the same in every draw; the best of them may beat the search.
        lowest = int(known.ce.argmin())
        beaten = known.ce[lowest] < best_total
        best[beaten] = known.members[lowest]
        best_total = np.where(beaten, known.ce[lowest], best_total)
    return best, best_total


def _rows(
    model: PoolModel,
    scope: str,
    ranking: _SizeRanking,
    known: _Known,
    p_best: list[float],
    level: float | None,
) -> list[Selection]:
    prediction = model.predict(ranking.members, level)
    measured = known.lookup(ranking.members)
    names = np.asarray(model.experts)
    out = []
    for n, (row, p) in enumerate(zip(ranking.members, p_best, strict=True)):
        merged = bool(np.isfinite(measured[n]))
        out.append(
            Selection(
                group=dict(model.group),
                scope=scope,
                k=int(row.sum()),
                rank=n + 1,
                subset=tuple(names[row]),
                mean=float(measured[n] if merged else prediction.mean[n]),
                lo=float(measured[n] if merged else prediction.lo[n]),
                hi=float(measured[n] if merged else prediction.hi[n]),
                p_best=p,
                merged=merged,
                method=ranking.method,
                extrapolated=bool(prediction.extrapolated[n]),
            )
        )
    return out


def _overall(
    model: PoolModel,
    leaders: list[list[Selection]],
    totals: np.ndarray,
    bests: np.ndarray,
    top: int,
) -> list[Selection]:
    """The best across sizes: each size's leaders ranked by their CE; p_best from the draws'
    best of every size (``totals``: (sizes, D) CE of each draw's best of a size)."""
    candidates = sorted((s for rows in leaders for s in rows), key=lambda s: s.mean)[:top]
    winner_size = totals.argmin(axis=0)
    winners = bests[winner_size, np.arange(totals.shape[1])]
    members = model.members_of([s.subset for s in candidates])
    p_best = _share_best(model, winners, members)
    return [
        Selection(**{**s.__dict__, "scope": "overall", "rank": rank, "p_best": p})
        for rank, (s, p) in enumerate(zip(candidates, p_best, strict=True), 1)
    ]


@dataclass(frozen=True)
class GreedyStep:
    """Adding ``added`` makes ``subset`` (size k): the model's prediction for it (None where a
    free curve did not measure k), and its CE if it was merged."""

    k: int
    added: str
    subset: tuple[str, ...]
    mean: float | None
    lo: float | None
    hi: float | None
    measured: float | None
    extrapolated: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "subset": list(self.subset)}


@dataclass(frozen=True)
class GreedyOrder:
    group: dict[str, Any]
    order: tuple[str, ...]
    steps: list[GreedyStep]

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": dict(self.group),
            "order": list(self.order),
            "steps": [step.to_dict() for step in self.steps],
        }


def greedy_order(model: PoolModel, level: float | None = None) -> GreedyOrder:
    """The order in which to add experts: each step the one whose addition gives the lowest CE
    (measured where that subset was merged, the model's mean elsewhere)."""
    f_hat, beta, gamma = split(model.theta, model.curve.q, model.m)
    known = _Known(model.records.members, model.records.ce)
    chosen = np.zeros(model.m, dtype=bool)
    names: list[str] = []
    steps = []
    for size in range(1, model.m + 1):
        grown = _grown(chosen)
        total = values(beta, gamma, grown, model.overlap)
        if model.curve.covers(size):
            total = total + float(model.curve.basis(np.array([size]))[0] @ f_hat)
        measured = known.lookup(grown)
        before, chosen = chosen, grown[int(np.where(np.isnan(measured), total, measured).argmin())]
        added = model.experts[int(np.flatnonzero(chosen & ~before)[0])]
        names.append(added)
        subset = tuple(np.asarray(model.experts)[chosen])
        mean = lo = hi = None
        if model.curve.covers(size):
            prediction = model.predict(chosen[None], level)
            mean, lo, hi = (float(v[0]) for v in (prediction.mean, prediction.lo, prediction.hi))
        ce = float(known.lookup(chosen[None])[0])
        steps.append(
            GreedyStep(
                k=size,
                added=added,
                subset=subset,
                mean=mean,
                lo=lo,
                hi=hi,
                measured=None if np.isnan(ce) else ce,
                extrapolated=model.curve.extrapolated(size),
            )
        )
    return GreedyOrder(dict(model.group), tuple(names), steps)
