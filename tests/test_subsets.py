"""Subset sampling: all combinations, uniform and balanced draws, the paper's permutations."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from hf_mergelaw.subsets import balance_subsets, diverse_permutations, sample_subsets


def expert_counts(subsets: list[tuple[int, ...]], num_experts: int) -> list[int]:
    counts = Counter(expert for subset in subsets for expert in subset)
    return [counts[e] for e in range(num_experts)]


def test_all_strategy_enumerates_every_combination() -> None:
    subsets = sample_subsets(9, 4, strategy="all")
    assert len(subsets) == math.comb(9, 4) == len(set(subsets))


def test_uniform_draws_distinct_subsets_reproducibly() -> None:
    first = sample_subsets(9, 3, strategy="uniform", per_k=20, seed=1)
    assert first == sample_subsets(9, 3, strategy="uniform", per_k=20, seed=1)
    assert first != sample_subsets(9, 3, strategy="uniform", per_k=20, seed=2)
    assert len(first) == len(set(first)) == 20
    assert all(len(s) == 3 and list(s) == sorted(s) for s in first)


def test_uniform_asking_for_more_than_exist_gives_all() -> None:
    assert len(sample_subsets(5, 4, strategy="uniform", per_k=50)) == math.comb(5, 4)


@pytest.mark.parametrize(
    ("num_experts", "k", "per_k"), [(9, 2, 15), (9, 4, 18), (20, 5, 12), (8, 7, 6)]
)
def test_balanced_draws_use_every_expert_equally_often(
    num_experts: int, k: int, per_k: int
) -> None:
    subsets = sample_subsets(num_experts, k, strategy="balanced", per_k=per_k, seed=3)
    assert len(subsets) == len(set(subsets)) == per_k
    assert all(len(s) == k and list(s) == sorted(s) for s in subsets)
    counts = expert_counts(subsets, num_experts)
    assert max(counts) - min(counts) <= 1
    assert subsets == sample_subsets(num_experts, k, strategy="balanced", per_k=per_k, seed=3)


def test_balancing_evens_out_a_skewed_draw_without_duplicates() -> None:
    skewed = [(0, 1, 2), (0, 1, 3), (0, 2, 3), (0, 1, 4), (0, 2, 4)]  # expert 5 never used
    balanced = balance_subsets(skewed, 6)
    assert sorted(expert_counts(balanced, 6)) == [2, 2, 2, 3, 3, 3]
    assert len(set(balanced)) == 5


def test_balanced_asks_for_more_than_exist_gives_all() -> None:
    assert sample_subsets(5, 2, strategy="balanced", per_k=50) == sample_subsets(
        5, 2, strategy="all"
    )


def test_paper_permutations_start_with_identity_and_reverse_and_spread_out() -> None:
    permutations = diverse_permutations(9, count=15, seed=0)
    assert permutations[0] == tuple(range(9)) and permutations[1] == tuple(range(8, -1, -1))
    assert len(set(permutations)) == 15
    # Greedy max-min Hamming distance keeps every pair far apart.
    closest = min(
        sum(x != y for x, y in zip(a, b, strict=True))
        for i, a in enumerate(permutations)
        for b in permutations[i + 1 :]
    )
    assert closest >= 6


def test_permutation_prefixes_are_the_subsets() -> None:
    subsets = sample_subsets(9, 1, strategy="permutations", per_k=15)
    assert (0,) in subsets and (8,) in subsets
    assert all(len(s) == 1 for s in subsets)


@pytest.mark.parametrize("k", [0, 10])
def test_k_outside_the_pool_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match=f"k={k} is outside 1..9"):
        sample_subsets(9, k, strategy="all")


def test_balance_cancels_additive_expert_effects() -> None:
    """To first order a merge's loss is the mean of its members' effects: when 18 * 4 is a
    multiple of 9 every expert appears equally often, and the balanced cell mean is the mean
    over all C(9, 4) subsets exactly, where a uniform draw of the same size is off."""
    effects = np.random.default_rng(0).standard_normal(9)

    def cell_mean(subsets: list[tuple[int, ...]]) -> float:
        return float(np.mean([effects[list(s)].mean() for s in subsets]))

    everything = cell_mean(sample_subsets(9, 4, strategy="all"))
    balanced = cell_mean(sample_subsets(9, 4, strategy="balanced", per_k=18))
    uniform = cell_mean(sample_subsets(9, 4, strategy="uniform", per_k=18))
    assert balanced == pytest.approx(everything, abs=1e-12)
    assert abs(uniform - everything) > 1e-3
