"""Adaptive sweeps' decisions (hf_mergelaw.adaptive) replayed on synthetic pools: the starting
design, the budget, fresh picks, stopping, and rounds that depend on the records alone."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from hf_mergelaw.adaptive import check_adaptive, next_round, start_counts, start_design
from hf_mergelaw.adaptive import replay as adaptive_replay
from hf_mergelaw.errors import SweepConfigError
from hf_mergelaw.pool_model import required_records, synthetic_pool
from hf_mergelaw.subsets import balanced_design

M = 7
KS = range(1, M + 1)


@pytest.fixture(scope="module")
def pool():
    return synthetic_pool(M, seed=4, beta_sd=0.03, gamma_sd=0.01, strong_pairs=2, noise_sd=0.002)


def measure(pool, subsets: list[tuple[str, ...]], seed: int) -> list[dict]:
    """Records of ``subsets`` (names), each measured once: a merge is deterministic."""
    index = {name: i for i, name in enumerate(pool.experts)}
    rows = [sorted(index[name] for name in subset) for subset in subsets]
    return pool.records(rows, seed=seed)


def replay(pool, budget: int, seed: int = 0, count: int = 1) -> tuple[list[dict], list, str]:
    """An adaptive sweep of the synthetic pool: its records, its rounds and why it stopped."""
    run = adaptive_replay(
        lambda picks, merged: measure(pool, list(picks), seed=merged),
        method="average",
        experts=pool.experts,
        ks=KS,
        budget=budget,
        count=count,
        seed=seed,
    )
    return run.records, run.rounds, run.stop


def test_start_design_is_the_minimum_balanced_over_sizes_and_experts(pool):
    counts = start_counts(M, KS)
    assert sum(counts.values()) == required_records(len(KS), M)
    assert set(counts) == set(KS) and counts[M] == 1 and min(counts.values()) >= 1
    design = start_design(pool.experts, KS, seed=3)
    assert len(set(design)) == len(design) == sum(counts.values())
    assert Counter(len(s) for s in design) == counts
    totals = Counter(name for subset in design for name in subset)
    assert set(totals) == set(pool.experts) and max(totals.values()) - min(totals.values()) <= 1
    order = {name: i for i, name in enumerate(pool.experts)}
    assert all(list(s) == sorted(s, key=order.get) for s in design)  # pool order, as sweeps key


@pytest.mark.parametrize(("m", "counts"), [(5, {1: 2, 2: 2, 3: 2}), (9, {2: 3, 5: 4, 8: 2})])
def test_balanced_design_keeps_each_size_and_the_totals_within_one(m, counts):
    design = balanced_design(m, counts, seed=1)
    for k, n in counts.items():
        here = [s for s in design if len(s) == k]
        assert len(set(here)) == n
        per_expert = Counter(e for s in here for e in s)
        assert max(per_expert.values()) - min(per_expert.get(e, 0) for e in range(m)) <= 1
    totals = [sum(e in s for s in design) for e in range(m)]
    assert max(totals) - min(totals) <= 1


def test_a_sweep_starts_balanced_then_picks_fresh_subsets_within_its_budget(pool):
    budget = required_records(len(KS), M) + 6
    records, rounds, stop = replay(pool, budget)
    assert len(rounds[0].picks) == required_records(len(KS), M)  # the start, in one round
    assert all(len(step.picks) == 1 for step in rounds[1:])  # then one per rank
    subsets = [frozenset(r["subset"]) for r in records]
    assert len(subsets) == len(set(subsets)) == budget
    assert stop == f"budget spent: {budget} merges (budget {budget})"


def test_a_round_depends_on_the_records_not_their_order(pool):
    records, _, _ = replay(pool, required_records(len(KS), M) + 3)
    shuffled = random.Random(0).sample(records, len(records))
    rounds = [
        next_round(rows, method="average", experts=pool.experts, ks=KS, budget=60, count=3)
        for rows in (records, shuffled)
    ]
    assert rounds[0] == rounds[1] and len(rounds[0].picks) == 3


def test_a_smaller_budget_stops_on_the_way_of_a_larger_one(pool):
    """What a resumed sweep relies on: each round is decided by the records alone, so a sweep
    that stopped (or was stopped) continues exactly where a longer one would have gone."""
    short, _, _ = replay(pool, 30)
    long, _, _ = replay(pool, 36)
    assert long[:30] == short


def test_other_methods_experts_and_sizes_do_not_count(pool):
    records, _, _ = replay(pool, required_records(len(KS), M))
    noise = [
        {**records[0], "method": "ties"},
        {**records[0], "subset": [*records[0]["subset"], "stranger"], "k": records[0]["k"] + 1},
    ]
    step = next_round(records + noise, method="average", experts=pool.experts, ks=KS, budget=99)
    assert step.merged == len(records) and step.picks


def test_a_sweep_that_merged_every_subset_says_so():
    small = synthetic_pool(4, seed=1, noise_sd=0.002)
    available = sum(math.comb(4, k) for k in range(1, 5))
    records, _, stop = [], [], None
    while stop is None:
        step = next_round(records, method="average", experts=small.experts, ks=range(1, 5),
                          budget=99)  # fmt: skip
        stop = step.stop
        records += measure(small, list(step.picks), seed=len(records))
    assert len(records) == available
    assert stop == f"every subset at k 1, 2, 3, 4 is merged ({available})"


def test_a_settled_answer_stops_before_the_budget(pool):
    records, _, stop = replay(pool, 200)
    assert stop.startswith(f"settled after {len(records)} merges: ")
    assert len(records) < 2**M - 1


@pytest.mark.parametrize(
    ("m", "ks", "budget", "message"),
    [
        (8, range(1, 9), 22, r"sampling.budget=22: .* needs 23 merges .* at least 23"),
        (8, range(1, 9), 0, r"sampling.budget=0: .* positive integer"),
        (8, range(1, 9), None, r"sampling.budget=None: .* positive integer"),
        (8, [1, 8], 40, r"two or more sizes below .* 8 experts; k has 1. Widen k"),
        (3, range(1, 4), 40, r"needs 8 merges .* only 7 subsets; use strategy: all"),
    ],
)
def test_adaptive_settings_the_pool_model_cannot_use_are_refused(m, ks, budget, message):
    with pytest.raises(SweepConfigError, match=message):
        check_adaptive(m, list(ks), budget)
