"""The best subsets: the swap search against brute force, p_best, the greedy order, selection."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hf_mergelaw.pool_model import (
    PoolModelError,
    best_subsets,
    fit_pool,
    greedy_order,
    pool_records,
    select,
    synthetic_pool,
)
from hf_mergelaw.pool_model.search import all_members, greedy_members, local_search, values
from hf_mergelaw.subsets import sample_subsets


def brute_force(
    beta: np.ndarray, gamma: np.ndarray, k: int, top: int, overlap: float = 1.0
) -> np.ndarray:
    scored = values(beta, gamma, all_members(beta.size, k), overlap)
    return np.sort(scored)[:top]


@pytest.mark.parametrize("seed", range(12))
def test_the_search_finds_brute_forces_best_subsets_on_strongly_interacting_pools(seed: int):
    """Pools of 10-15 experts where pairs dominate (many local optima); every size; members
    weighing 1/k (an average) and more (a disjoint mean, where the pairs weigh more still)."""
    m = 10 + seed % 6
    overlap = (1.0, 0.3)[seed % 2]
    pool = synthetic_pool(
        m, seed=seed, beta_sd=0.02, gamma_sd=0.05, strong_pairs=m // 2, outliers=1
    )
    for k in range(2, m - 1):
        found = best_subsets(pool.beta, pool.gamma, k, top=5, seed=seed, limit=0, overlap=overlap)
        assert found.method == "search"
        expected = brute_force(pool.beta, pool.gamma, k, 5, overlap)
        assert found.values == pytest.approx(expected, abs=1e-12)
        assert (found.members.sum(axis=1) == k).all()


def test_enumeration_ranks_every_subset():
    pool = synthetic_pool(9, seed=0, strong_pairs=3)
    ranked = best_subsets(pool.beta, pool.gamma, 4, top=126)
    assert ranked.method == "enumeration" and len(ranked.values) == math.comb(9, 4)
    assert np.all(np.diff(ranked.values) >= 0)
    assert np.unique(ranked.members, axis=0).shape[0] == math.comb(9, 4)


def test_local_search_ends_where_no_swap_helps_and_never_worsens():
    pool = synthetic_pool(12, seed=1, gamma_sd=0.05, strong_pairs=6)
    rng = np.random.default_rng(0)
    starts = np.zeros((20, 12), dtype=bool)
    for row in starts:
        row[rng.choice(12, 5, replace=False)] = True
    beta = np.broadcast_to(pool.beta, (20, 12))
    gamma = np.broadcast_to(pool.gamma, (20, 12, 12))
    found, value = local_search(beta, gamma, starts)
    assert (found.sum(axis=1) == 5).all()
    assert np.all(value <= values(beta, gamma, starts) + 1e-15)
    for row, v in zip(found, value, strict=True):
        for i in np.flatnonzero(row):
            for j in np.flatnonzero(~row):
                swapped = row.copy()
                swapped[[i, j]] = [False, True]
                assert values(pool.beta, pool.gamma, swapped) >= v - 1e-12


@pytest.mark.parametrize("overlap", [1.0, 0.3])
def test_greedy_adds_the_expert_that_lowers_the_next_size_most(overlap: float):
    pool = synthetic_pool(7, seed=2, strong_pairs=2)
    chosen = greedy_members(pool.beta, pool.gamma, 3, overlap)
    two = greedy_members(pool.beta, pool.gamma, 2, overlap)
    options = []
    for j in np.flatnonzero(~two):
        grown = two.copy()
        grown[j] = True
        options.append((values(pool.beta, pool.gamma, grown, overlap), j))
    assert chosen[min(options)[1]] and (chosen & two).sum() == 2


@pytest.fixture(scope="module")
def model():
    m = 8
    pool = synthetic_pool(m, seed=6, beta_sd=0.03, gamma_sd=0.01, noise_sd=0.004, strong_pairs=3)
    subsets = [
        s for k in range(1, m + 1) for s in sample_subsets(m, k, strategy="balanced", per_k=8)
    ]
    return fit_pool(pool_records(pool.records(subsets, seed=0))[0])


def test_selection_ranks_each_size_and_overall(model):
    chosen = select(model, top=3, draws=300)
    sizes = [s for s in chosen if s.scope == "size"]
    overall = [s for s in chosen if s.scope == "overall"]
    assert sorted({s.k for s in sizes}) == list(range(1, model.m + 1))
    assert len(overall) == 3 and overall[0].mean == min(s.mean for s in sizes)
    for k in range(1, model.m + 1):
        ranked = [s for s in sizes if s.k == k]
        assert [s.rank for s in ranked] == list(range(1, len(ranked) + 1))
        assert all(a.mean <= b.mean for a, b in itertools.pairwise(ranked))
        assert sum(s.p_best for s in ranked) <= 1 + 1e-12
        assert all(len(s.subset) == k for s in ranked)
        assert all(s.lo == s.mean == s.hi if s.merged else s.lo < s.mean < s.hi for s in ranked)
    assert [s.p_best for s in sizes if s.k == model.m] == [1.0]


def test_merged_subsets_rank_by_what_they_measured(model):
    """At k = M - 1 every subset was merged: the ranking is the records' own."""
    k = model.m - 1
    here = model.records.k == k
    order = np.argsort(model.records.ce[here])[:3]
    chosen = select(model, k, top=3, draws=50)
    assert all(s.merged for s in chosen)
    assert [s.mean for s in chosen] == list(model.records.ce[here][order])
    assert chosen[0].p_best == 1.0


def test_p_best_counts_the_draws_in_which_a_subset_wins(model):
    """For one size, p_best equals the share of draws whose enumerated best is that subset:
    each draw's CE for the unmerged subsets, the measured CE for the merged ones."""
    from hf_mergelaw.pool_model.design import design

    k, draws, seed = 3, 400, 7
    chosen = select(model, k, top=2, draws=draws, seed=seed)
    members = all_members(model.m, k)
    totals = model.draws(draws, seed) @ design(model.curve, members).T
    for row, ce in zip(model.records.members, model.records.ce, strict=True):
        totals[:, (members == row).all(axis=1)] = ce
    winners = members[totals.argmin(axis=1)]
    for s in chosen:
        row = model.members_of([s.subset])[0]
        assert s.p_best == pytest.approx(np.mean((winners == row).all(axis=1)))


def test_p_best_by_search_agrees_with_enumeration(model):
    exact = select(model, 4, top=3, draws=300, seed=1)
    searched = select(model, 4, top=3, draws=300, seed=1, limit=0)
    assert [s.method for s in searched] == ["search"] * 3
    assert [s.subset for s in searched] == [s.subset for s in exact]
    assert [s.p_best for s in searched] == pytest.approx([s.p_best for s in exact], abs=0.02)


def test_selection_refuses_sizes_outside_the_pool_or_unmeasured(model):
    with pytest.raises(PoolModelError, match="has 8 experts"):
        select(model, 9)
    m = 6
    pool = synthetic_pool(m, seed=0)
    subsets = [s for k in (1, 2, 4) for s in sample_subsets(m, k, strategy="all")]
    free = fit_pool(pool_records(pool.records(subsets))[0])
    with pytest.raises(PoolModelError, match="k = 3 was not measured"):
        select(free, 3)
    assert {s.k for s in select(free, draws=50)} == {1, 2, 4}


def test_the_greedy_order_walks_every_size(model):
    path = greedy_order(model)
    assert sorted(path.order) == sorted(model.experts)
    assert [step.k for step in path.steps] == list(range(1, model.m + 1))
    assert path.steps[0].subset == (path.order[0],)
    assert all(step.lo < step.mean < step.hi for step in path.steps)
    merged = {tuple(np.asarray(model.experts)[row]) for row in model.records.members}
    assert all((step.measured is not None) == (step.subset in merged) for step in path.steps)
    # Every single expert was merged: the one that measured best starts the path.
    singles = model.records.k == 1
    best = model.records.members[singles][model.records.ce[singles].argmin()]
    assert path.steps[0].subset == tuple(np.asarray(model.experts)[best])
    assert path.steps[0].measured == model.records.ce[singles].min()
