"""Subset sampling: all combinations, uniform draws, the paper's diverse permutations."""

from __future__ import annotations

import math

import pytest

from hf_mergelaw.subsets import diverse_permutations, sample_subsets


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
