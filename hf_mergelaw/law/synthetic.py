"""Synthetic sweeps drawn from known law parameters, for tests, benchmarks and demos.

Means come from the joint law and the per-subset scatter from the variance law (the paper's tables
ship in :mod:`hf_mergelaw.law.paper`). Two scatter models:

- ``"pool"``: each size has a pool of experts with random effects, and a subset's deviation is the
  mean of its members' effects, scaled so the variance across all C(M, k) subsets equals the
  variance law. Subsets share experts, so a cell that holds every combination has a mean exactly
  on the law (as in the paper, whose cells up to 7B hold all combinations).
- ``"independent"``: each subset's CE is an independent normal draw around the law mean, the
  assumption under which the within-cell bootstrap is exact.
- ``"population"``: each size's experts are drawn from a population and a subset's deviation is
  the mean of its members' effects, scaled so the variance across random subsets of random
  experts equals the variance law. The law is the population's mean curve; a pool's own cells
  sit off it by the mean effect of the experts it happens to have (what planning must allow for).

Usage::

    params = joint_fits()[("average", "code")]
    var = variance_fits()[("average", "code")]
    records = synthetic_sweep(params, var, seed=0, method="average", domain="code")
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from math import comb
from typing import Any, Literal

import numpy as np

from ..subsets import balance_subsets
from .laws import JOINT, VARIANCE
from .paper import PAPER_SIZES


def joint_mean(params: Mapping[str, float], N: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Joint-law mean CE at (N, k) for a dict of ``L_star, B, beta, A0, gamma, b``."""
    theta = np.array([params[n] for n in JOINT.param_names])
    nn, kk = np.broadcast_arrays(np.asarray(N, float), np.asarray(k, float))
    return JOINT.evaluate(theta, {"N": nn, "k": kk})


def joint_variance(params: Mapping[str, float], N: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Variance-law value at (N, k) for a dict of ``V_star, B_v, beta_v, A0_v, gamma_v, b_v``."""
    theta = np.array([params[n] for n in VARIANCE.param_names])
    nn, kk = np.broadcast_arrays(np.asarray(N, float), np.asarray(k, float))
    return VARIANCE.evaluate(theta, {"N": nn, "k": kk})


def synthetic_sweep(
    mean_params: Mapping[str, float],
    variance_params: Mapping[str, float] | None = None,
    *,
    sizes: Sequence[float] = PAPER_SIZES,
    ks: Sequence[int] = tuple(range(1, 10)),
    pool_size: int = 9,
    subsets: int | Literal["paper", "all"] = "paper",
    scatter: Literal["pool", "independent", "population"] = "pool",
    design: Literal["uniform", "balanced"] = "uniform",
    seed: int = 0,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Records ``{"k", "ce", "N", "subset", **fields}`` for every size and k.

    Args:
        mean_params: joint-law parameters.
        variance_params: variance-law parameters; None gives noise-free records (one per cell).
        subsets: subsets per cell: ``"all"`` combinations, an int cap (uniform without
            replacement, at most C(M, k)), or ``"paper"`` (all up to 7B, 15 above).
        scatter: ``"pool"``, ``"independent"`` or ``"population"`` (see the module docstring).
        design: how capped cells pick their subsets: ``"uniform"`` draws, or ``"balanced"``
            (every expert equally often, as the sweep's ``balanced`` strategy).
        fields: constant fields added to every record (``method="ties"``, ...).
    """
    rng = np.random.default_rng(seed)
    experts = [f"e{i}" for i in range(pool_size)]
    records = []
    for size in sizes:
        effects = rng.standard_normal(pool_size)
        for k in ks:
            chosen = _choose_subsets(pool_size, k, _cap(subsets, size), rng)
            if design == "balanced":
                chosen = balance_subsets(chosen, pool_size, seed=int(rng.integers(2**31)))
            mean = float(joint_mean(mean_params, size, k))
            if variance_params is None:
                ce = np.full(1, mean)
                chosen = chosen[:1]
            else:
                sd = float(np.sqrt(max(joint_variance(variance_params, size, k), 0.0)))
                ce = mean + sd * _deviations(chosen, effects, scatter, rng)
            records += [
                {"k": k, "ce": float(c), "N": size, "subset": [experts[i] for i in s], **fields}
                for c, s in zip(ce, chosen, strict=True)
            ]
    return records


def _cap(subsets: int | str, size: float) -> int | None:
    if subsets == "all":
        return None
    if subsets == "paper":
        return None if size <= 7 else 15
    return int(subsets)


def _choose_subsets(
    m: int, k: int, cap: int | None, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    total = comb(m, k)
    if cap is None or cap >= total:
        return list(itertools.combinations(range(m), k))
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < cap:
        chosen.add(tuple(sorted(rng.choice(m, size=k, replace=False).tolist())))
    return sorted(chosen)


def _deviations(
    chosen: list[tuple[int, ...]], effects: np.ndarray, scatter: str, rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance deviations of each subset from the cell mean."""
    if scatter == "independent":
        return rng.standard_normal(len(chosen))
    m, k = effects.size, len(chosen[0])
    if scatter == "population":
        # Effects are N(0, 1) draws: a mean of k has variance 1/k over experts and subsets.
        return np.sqrt(k) * np.array([effects[list(s)].mean() for s in chosen])
    if k == m:
        return np.zeros(len(chosen))
    centred = effects - effects.mean()
    # Over all C(m, k) subsets the subset mean has variance sigma^2/k (m-k)/(m-1), sigma^2 the
    # effects' population variance; the C/(C-1) factor makes the ddof=1 sample variance of a
    # full cell equal the law exactly.
    n_all = comb(m, k)
    sd_all = np.sqrt(centred.var() / k * (m - k) / (m - 1) * n_all / (n_all - 1))
    return np.array([centred[list(s)].mean() for s in chosen]) / sd_all
