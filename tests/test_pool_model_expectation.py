"""The pool's curve: the exact mean and spread of L(S) over every subset equal enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hf_mergelaw.pool_model import (
    fit_pool,
    pool_curve,
    pool_records,
    subset_moments,
    synthetic_pool,
)
from hf_mergelaw.pool_model.expectation import inclusion
from hf_mergelaw.pool_model.search import all_members, values
from hf_mergelaw.subsets import sample_subsets


@pytest.mark.parametrize("overlap", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("m", [2, 3, 5, 7])
def test_moments_over_every_subset_equal_enumeration(m: int, overlap: float) -> None:
    rng = np.random.default_rng(m)
    beta = rng.normal(0.3, 0.1, m)  # a non-zero mean: the formula must not assume centring
    gamma = rng.normal(0.05, 0.2, (m, m))
    gamma = np.triu(gamma, 1) + np.triu(gamma, 1).T
    for k in range(1, m + 1):
        enumerated = values(beta, gamma, all_members(m, k), overlap)
        mean, var = subset_moments(beta, gamma, k, overlap)
        assert mean == pytest.approx(enumerated.mean(), abs=1e-12)
        assert var == pytest.approx(enumerated.var(), abs=1e-12)


def test_moments_are_batched_over_draws() -> None:
    rng = np.random.default_rng(0)
    beta = rng.normal(size=(3, 6))
    gamma = rng.normal(size=(3, 6, 6))
    gamma = np.triu(gamma, 1) + np.transpose(np.triu(gamma, 1), (0, 2, 1))
    mean, var = subset_moments(beta, gamma, 3)
    for d in range(3):
        one_mean, one_var = subset_moments(beta[d], gamma[d], 3)
        assert (mean[d], var[d]) == pytest.approx((one_mean, one_var))


def test_inclusion_probabilities() -> None:
    assert inclusion(8, 3, 1) == pytest.approx(3 / 8)
    assert inclusion(8, 3, 2) == pytest.approx(math.comb(6, 1) / math.comb(8, 3))
    assert inclusion(8, 3, 4) == 0.0


@pytest.fixture(scope="module")
def model():
    m = 7
    pool = synthetic_pool(m, seed=4, beta_sd=0.03, gamma_sd=0.015, strong_pairs=3)
    subsets = [
        s for k in range(1, m + 1) for s in sample_subsets(m, k, strategy="balanced", per_k=7)
    ]
    return fit_pool(pool_records(pool.records(subsets, seed=0))[0])


def test_the_pool_curve_is_the_mean_of_every_subsets_prediction(model) -> None:
    for point in pool_curve(model):
        members = all_members(model.m, point.k)
        predicted = model.predict(members).mean
        assert point.n_subsets == members.shape[0]
        assert point.mean == pytest.approx(predicted.mean(), abs=1e-12)
        assert point.lo < point.mean < point.hi
        assert point.spread_lo <= point.spread <= point.spread_hi


def test_the_spread_is_the_sd_of_the_predictions_plus_one_merges_misfit(model) -> None:
    k = 3
    (point,) = pool_curve(model, [k], draws=4000)
    predicted = model.predict(all_members(model.m, k)).mean
    n = math.comb(model.m, k)
    expected = math.sqrt(predicted.var() + float(model.hyper.noise_var(k)) * (n - 1) / n)
    # The point is the posterior median over draws, which sits above the plug-in value.
    assert expected * 0.9 < point.spread < expected * 1.3
    assert point.spread_lo < expected


def test_a_pool_of_every_expert_has_no_spread(model) -> None:
    (point,) = pool_curve(model, [model.m])
    assert point.n_subsets == 1 and point.spread == 0.0


def test_the_curve_over_a_free_fit_covers_the_measured_sizes_only() -> None:
    m = 6
    pool = synthetic_pool(m, seed=1)
    subsets = [s for k in (1, 2, 4) for s in itertools.combinations(range(m), k)]
    fitted = fit_pool(pool_records(pool.records(subsets))[0])
    assert [point.k for point in pool_curve(fitted)] == [1, 2, 4]
    assert not any(point.extrapolated for point in pool_curve(fitted))
    law = fit_pool(pool_records(pool.records(subsets))[0], curve="law")
    assert [(p.k, p.extrapolated) for p in pool_curve(law)] == [
        (1, False),
        (2, False),
        (3, True),
        (4, False),
        (5, True),
        (6, True),
    ]
