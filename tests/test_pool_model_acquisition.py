"""What to merge next: scores are exact variance reductions, and picks beat random merges."""

from __future__ import annotations

import numpy as np
import pytest

from hf_mergelaw.pool_model import (
    PoolModelError,
    answer_targets,
    candidate_subsets,
    fit_pool,
    next_subsets,
    pool_curve,
    pool_records,
    prediction_targets,
    synthetic_pool,
)
from hf_mergelaw.pool_model.design import design
from hf_mergelaw.pool_model.evidence import prior_precision
from hf_mergelaw.subsets import sample_subsets

M = 8


@pytest.fixture(scope="module")
def pool():
    return synthetic_pool(M, seed=2, beta_sd=0.03, gamma_sd=0.015, strong_pairs=3, noise_sd=0.003)


@pytest.fixture(scope="module")
def model(pool):
    """A small start: 4 balanced subsets per k."""
    subsets = [
        s for k in range(1, M + 1) for s in sample_subsets(M, k, strategy="balanced", per_k=4)
    ]
    return fit_pool(pool_records(pool.records(subsets, seed=0))[0])


def covariance_with(model, extra: np.ndarray) -> np.ndarray:
    """The posterior covariance refitted with ``extra`` merges added, prior scales held."""
    members = np.concatenate([model.records.members, extra])
    z = design(model.curve, members)
    hyper = model.hyper
    w = hyper.sigma**2 / hyper.noise_var(members.sum(axis=1))
    precision = prior_precision(
        model.curve.q,
        model.m,
        (hyper.tau_beta / hyper.sigma) ** 2,
        (hyper.tau_gamma / hyper.sigma) ** 2,
    )
    a = z.T @ (z * w[:, None]) + np.diag(precision)
    return hyper.sigma**2 * np.linalg.inv(a)


@pytest.mark.parametrize("kind", ["answers", "predictions"])
def test_each_score_is_the_variance_the_merge_removes_after_the_earlier_picks(model, kind):
    candidates = candidate_subsets(model)[:40]
    targets = answer_targets(model) if kind == "answers" else prediction_targets(model, candidates)
    picks = next_subsets(model, 4, candidates=candidates, targets=targets)
    before = np.sum((targets @ model.covariance) * targets, axis=1)
    chosen = np.zeros((0, M), dtype=bool)
    previous = model.covariance
    for pick in picks:
        chosen = np.concatenate([chosen, model.members_of([pick.subset])])
        after = covariance_with(model, chosen)
        removed = np.sum((targets @ previous) * targets, axis=1) - np.sum(
            (targets @ after) * targets, axis=1
        )
        assert pick.score == pytest.approx(float(np.sum(removed / before)), rel=1e-6)
        previous = after


def test_a_round_names_distinct_unmerged_subsets_the_best_first(model):
    picks = next_subsets(model, 10)
    merged = {tuple(np.asarray(model.experts)[row]) for row in model.records.members}
    assert len({p.subset for p in picks}) == 10
    assert not {p.subset for p in picks} & merged
    assert next_subsets(model, 1) == picks[:1]
    assert all(p.k == len(p.subset) for p in picks)


def test_chosen_merges_settle_the_answers_faster_than_random_ones(model):
    targets = answer_targets(model)
    candidates = candidate_subsets(model)
    before = np.sum((targets @ model.covariance) * targets, axis=1)

    def remaining(extra: np.ndarray) -> float:
        after = covariance_with(model, extra)
        return float(np.mean(np.sum((targets @ after) * targets, axis=1) / before))

    picked = model.members_of([p.subset for p in next_subsets(model, 12)])
    rng = np.random.default_rng(0)
    random_rounds = [
        remaining(candidates[rng.choice(len(candidates), 12, replace=False)]) for _ in range(10)
    ]
    assert remaining(picked) < min(random_rounds)


def test_targets_hold_the_curve_and_the_best_subset_contrasts(model):
    targets = answer_targets(model, top=3)
    # E[L | k] at each of the M sizes; two runner-up contrasts at each size but k = M.
    assert targets.shape == (M + 2 * (M - 1), model.theta.size)


def test_prediction_targets_are_each_subsets_deviation_from_its_sizes_mean(model):
    members = candidate_subsets(model)[::25]
    curve = {point.k: point.mean for point in pool_curve(model)}
    expected = model.predict(members).mean - [curve[k] for k in members.sum(axis=1)]
    np.testing.assert_allclose(prediction_targets(model, members) @ model.theta, expected)


def test_candidates_skip_merged_subsets_and_unmeasured_sizes(pool):
    subsets = [s for k in (1, 2, 4) for s in sample_subsets(M, k, strategy="balanced", per_k=8)]
    free = fit_pool(pool_records(pool.records(subsets))[0])
    candidates = candidate_subsets(free)
    assert set(candidates.sum(axis=1)) == {2, 4}  # every single expert is merged already
    merged = {row.tobytes() for row in free.records.members}
    assert not any(row.tobytes() in merged for row in candidates)


def test_nothing_left_to_merge_is_an_error(pool):
    subsets = [s for k in (1, 2, 7) for s in sample_subsets(M, k, strategy="all")]
    everything = fit_pool(pool_records(pool.records(subsets))[0])
    with pytest.raises(PoolModelError, match="every subset at the measured sizes is merged"):
        next_subsets(everything, 3)
