"""Which subsets of k experts a sweep merges: all, uniform, balanced, or the paper's permutations.

All strategies are seeded and return subsets as sorted tuples of expert indices, in a stable order,
so a re-run of a sweep plans exactly the same jobs (resuming relies on it).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping

from .errors import UserError

STRATEGIES = ("all", "uniform", "balanced", "permutations")
PAPER_NUM_PERMUTATIONS = 15
PAPER_SHUFFLE_CANDIDATES = 1000
# Above this many merges per method, strategy "all" is a mistake rather than a plan.
MAX_ALL_SUBSETS = 100_000


def check_all_subsets(num_experts: int, ks: Iterable[int]) -> None:
    """Refuse ``strategy: all`` when it would plan more than :data:`MAX_ALL_SUBSETS` merges."""
    ks = list(ks)
    total = sum(math.comb(num_experts, k) for k in ks)
    if total > MAX_ALL_SUBSETS:
        raise UserError(
            f"strategy 'all' with {num_experts} experts and k {min(ks)}-{max(ks)} is {total:,} "
            f"merges per method; at most {MAX_ALL_SUBSETS:,} are planned this way. Use strategy "
            "'balanced' (per_k subsets per k, every expert equally often) or fewer k values."
        )


def sample_subsets(
    num_experts: int,
    k: int,
    *,
    strategy: str = "balanced",
    per_k: int = 20,
    seed: int = 0,
) -> list[tuple[int, ...]]:
    """Subsets of size k of range(num_experts) to merge.

    `all`: every combination (per_k ignored). `uniform`: per_k distinct subsets drawn uniformly
    (all of them when there are fewer). `balanced`: per_k distinct subsets in which every expert
    appears equally often (within one), see :func:`balance_subsets`. `permutations`: the length-k
    prefixes of per_k diverse permutations (the paper's Algorithm 1), duplicates removed.

    >>> sample_subsets(4, 2, strategy="all")
    [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    """
    if not 1 <= k <= num_experts:
        raise UserError(
            f"k={k} is outside 1..{num_experts}: a pool of {num_experts} experts has no subset "
            f"of that size. Lower the largest k or add experts."
        )
    if strategy == "all":
        check_all_subsets(num_experts, [k])
        return list(itertools.combinations(range(num_experts), k))
    if strategy == "uniform":
        return _uniform_subsets(num_experts, k, per_k, seed)
    if strategy == "balanced":
        return balance_subsets(_uniform_subsets(num_experts, k, per_k, seed), num_experts, seed)
    if strategy == "permutations":
        prefixes = (tuple(sorted(p[:k])) for p in diverse_permutations(num_experts, per_k, seed))
        return list(dict.fromkeys(prefixes))
    raise UserError(f"unknown sampling strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")


def diverse_permutations(
    num_experts: int,
    count: int = PAPER_NUM_PERMUTATIONS,
    seed: int = 0,
    candidates: int = PAPER_SHUFFLE_CANDIDATES,
) -> list[tuple[int, ...]]:
    """The paper's Algorithm 1: identity, its reverse, then greedy max-min Hamming distance.

    Each further permutation is the best of `candidates` random shuffles by its minimum Hamming
    distance to the permutations already chosen, so prefixes of every length cover the pool
    evenly.
    """
    rng = random.Random(seed)
    identity = tuple(range(num_experts))
    chosen = list(dict.fromkeys([identity, identity[::-1]]))[:count]
    while len(chosen) < count:
        best, best_distance = None, -1
        for _ in range(candidates):
            shuffle = list(identity)
            rng.shuffle(shuffle)
            distance = min(_hamming(shuffle, other) for other in chosen)
            if distance > best_distance:
                best, best_distance = tuple(shuffle), distance
        chosen.append(best)
    return chosen


def balance_subsets(
    subsets: list[tuple[int, ...]], num_experts: int, seed: int = 0
) -> list[tuple[int, ...]]:
    """Swap single experts until each appears in the subsets equally often (counts within one).

    Why: to first order a merge's loss moves with the mean of its members' task vectors
    (docs/law.md section 3), so the part of a cell's mean loss that comes from which experts were
    drawn is the count-weighted mean of per-expert effects. Equal counts cancel it, leaving the
    much smaller pairwise part: a balanced cell's mean sits on the law with far fewer subsets.
    The procedure treats experts alike (random draw, random tie-breaks), so every subset is
    equally likely to be merged and a cell's mean stays unbiased for the all-subsets mean.

    Each step moves one subset from the most- to the least-used expert. Such a move to a subset
    not already chosen always exists while their counts differ by two or more (the map
    S -> S - {hi} + {lo} is injective and hi is in more subsets than lo), and every move lowers
    the sum of squared counts, so the loop ends.

    >>> balanced = balance_subsets([(0, 1), (0, 2)], 4)
    >>> [sum(expert in subset for subset in balanced) for expert in range(4)]
    [1, 1, 1, 1]
    """
    rng = random.Random(f"balance-{seed}")
    chosen = sorted(set(subsets))
    members = set(chosen)
    counts = [0] * num_experts
    for subset in chosen:
        for expert in subset:
            counts[expert] += 1
    while max(counts) - min(counts) >= 2:
        hi = max(range(num_experts), key=lambda e: (counts[e], rng.random()))
        lo = min(range(num_experts), key=lambda e: (counts[e], rng.random()))
        moves = [
            (i, moved)
            for i, subset in enumerate(chosen)
            if hi in subset
            and lo not in subset
            and (moved := tuple(sorted({*subset} - {hi} | {lo}))) not in members
        ]
        i, moved = rng.choice(moves)
        members.remove(chosen[i])
        members.add(moved)
        chosen[i] = moved
        counts[hi] -= 1
        counts[lo] += 1
    return sorted(chosen)


def balanced_design(
    num_experts: int, counts: Mapping[int, int], seed: int = 0
) -> list[tuple[int, ...]]:
    """``counts[k]`` subsets of each size k, each size balanced, and the experts' totals over all
    sizes balanced too (within one), in order of size.

    Each size is drawn as ``strategy="balanced"`` draws it, then its experts are relabelled: the
    ones it uses most take the places of the ones the sizes before used least. Relabelling keeps
    a size balanced and its subsets distinct, and spreads across sizes the extra appearances a
    size cannot split evenly, so the totals stay within one (both sets of counts are), and every
    expert is merged once the design has as many places as experts.

    >>> design = balanced_design(4, {1: 2, 2: 1})
    >>> sorted(sum(expert in subset for subset in design) for expert in range(4))
    [1, 1, 1, 1]
    """
    rng = random.Random(f"design-{seed}")
    totals = [0] * num_experts
    design: list[tuple[int, ...]] = []
    for k in sorted(counts):
        drawn = sample_subsets(num_experts, k, strategy="balanced", per_k=counts[k], seed=seed)
        here = [sum(expert in subset for subset in drawn) for expert in range(num_experts)]
        busiest = sorted(range(num_experts), key=lambda e: (-here[e], rng.random()))
        idlest = sorted(range(num_experts), key=lambda e: (totals[e], rng.random()))
        relabel = dict(zip(busiest, idlest, strict=True))
        for subset in sorted(tuple(sorted(relabel[e] for e in subset)) for subset in drawn):
            design.append(subset)
            for expert in subset:
                totals[expert] += 1
    return design


def _uniform_subsets(num_experts: int, k: int, per_k: int, seed: int) -> list[tuple[int, ...]]:
    total = math.comb(num_experts, k)
    if per_k >= total:
        return list(itertools.combinations(range(num_experts), k))
    # Seed per (seed, n, k) so adding a k to a sweep does not change the subsets of the others.
    rng = random.Random(f"{seed}-{num_experts}-{k}")
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < per_k:
        chosen[tuple(sorted(rng.sample(range(num_experts), k)))] = None
    return list(chosen)


def _hamming(a: Iterable[int], b: Iterable[int]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))
