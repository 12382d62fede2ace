"""The pool model recovers known effects, predicts unmerged subsets with honest intervals, and
chooses its shrinkage from the data.

Pools are synthetic (:mod:`hf_mergelaw.pool_model.synthetic`): f(k) from the per-size law, beta
and gamma drawn with far-off experts and strongly interacting pairs, misfit falling with k.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from hf_mergelaw.pool_model import (
    PoolModelError,
    PoolReport,
    coverage,
    fit_pool,
    pool_records,
    synthetic_pool,
    within_k_r2,
)
from hf_mergelaw.pool_model.design import design, pairs
from hf_mergelaw.pool_model.evidence import normal_equations, size_stats, solve
from hf_mergelaw.subsets import sample_subsets

M = 8


def balanced_design(m: int, per_k: int, seed: int, ks: range | None = None) -> list[tuple]:
    ks = range(1, m + 1) if ks is None else ks
    return [
        s for k in ks for s in sample_subsets(m, k, strategy="balanced", per_k=per_k, seed=seed)
    ]


def every_subset(m: int) -> list[tuple]:
    return [s for k in range(1, m + 1) for s in itertools.combinations(range(m), k)]


def centred(values: np.ndarray) -> np.ndarray:
    return values - values.mean()


@pytest.fixture(scope="module")
def pool():
    """Two far-off experts and four strongly interacting pairs."""
    return synthetic_pool(M, seed=3, beta_sd=0.03, gamma_sd=0.01, outliers=2, strong_pairs=4)


@pytest.fixture(scope="module")
def full_model(pool):
    """Fitted on every subset."""
    return fit_pool(pool_records(pool.records(every_subset(M), seed=1))[0])


@pytest.fixture(scope="module")
def balanced_model(pool):
    """Fitted on 8 subsets per k, as the demo sweeps."""
    return fit_pool(pool_records(pool.records(balanced_design(M, 8, seed=0), seed=1))[0])


def test_every_subset_recovers_each_experts_effect_and_each_pairs_interaction(pool, full_model):
    # Effects spread over +-0.2 (beta) and +-0.08 (gamma); a merge's misfit has sd 0.002.
    beta = np.array([full_model.beta[name] for name in pool.experts])
    assert np.abs(beta - centred(pool.beta)).max() < 3 * pool.noise_sd
    i, j = pairs(M)
    true_gamma = centred(pool.gamma[i, j])
    fitted = full_model.gamma_matrix()[i, j]
    assert np.abs(fitted - true_gamma).max() < 4 * pool.noise_sd
    # The strongly interacting pairs come out as the most extreme ones, with their signs.
    strong = np.argsort(-np.abs(true_gamma))[:4]
    assert set(np.argsort(-np.abs(fitted))[:4]) == set(strong)
    assert np.all(np.sign(fitted[strong]) == np.sign(true_gamma[strong]))


def test_reported_effects_are_relative_to_the_average_expert_and_pair(full_model):
    assert abs(sum(full_model.beta.values())) < 1e-9
    i, j = pairs(M)
    assert abs(full_model.gamma_matrix()[i, j].mean()) < 1e-9
    assert np.allclose(full_model.gamma_matrix(), full_model.gamma_matrix().T)
    interval = full_model.beta_interval()
    assert all(lo < full_model.beta[n] < hi for n, (lo, hi) in interval.items())


def test_intervals_of_the_effects_cover_the_truth(pool, full_model):
    interval = full_model.beta_interval(0.99)
    truth = dict(zip(pool.experts, centred(pool.beta), strict=True))
    assert all(lo <= truth[name] <= hi for name, (lo, hi) in interval.items())


def test_a_balanced_sweep_predicts_the_subsets_it_never_merged(pool, balanced_model):
    measured = {tuple(np.flatnonzero(row)) for row in balanced_model.records.members}
    held_out = [s for s in every_subset(M) if s not in measured]
    members = pool.members(held_out)
    truth = pool.measure(members, seed=99)
    prediction = balanced_model.predict(members)
    assert within_k_r2(truth, prediction.mean, members.sum(axis=1)) > 0.97
    assert 0.8 <= coverage(truth, prediction.lo, prediction.hi) <= 1.0
    assert not prediction.extrapolated.any()


@pytest.mark.parametrize("strategy", ["uniform", "permutations", "all"])
def test_any_sweep_design_fits(pool, strategy: str):
    subsets = [
        s for k in range(1, M + 1) for s in sample_subsets(M, k, strategy=strategy, per_k=10)
    ]
    model = fit_pool(pool_records(pool.records(subsets, seed=1))[0])
    members = pool.members([s for s in every_subset(M) if 1 < len(s) < M])
    truth = pool.true_ce(members)
    assert within_k_r2(truth, model.predict(members).mean, members.sum(axis=1)) > 0.95


def test_strongly_interacting_experts_are_predicted_from_a_balanced_sweep():
    """Where pairs dominate, even the true own effects without the interactions predict worse
    than the mean of each size; the fit predicts the unmerged subsets."""
    pool = synthetic_pool(M, seed=3, beta_sd=0.01, gamma_sd=0.02, strong_pairs=4)
    model = fit_pool(pool_records(pool.records(balanced_design(M, 8, seed=0), seed=1))[0])
    members = pool.members([s for s in every_subset(M) if 1 < len(s) < M])
    truth, k = pool.true_ce(members), members.sum(axis=1)
    additive = replace(pool, gamma=np.zeros((M, M))).true_ce(members)
    assert within_k_r2(truth, additive, k) < 0
    assert within_k_r2(truth, model.predict(members).mean, k) > 0.95


def test_shrinkage_follows_the_data_not_a_constant():
    """Scaling every effect and the misfit by 10 scales the chosen prior scales by 10, and a pool
    without interactions gets a much smaller gamma scale than one with them."""
    subsets = balanced_design(M, 8, seed=1)
    base = synthetic_pool(M, seed=5, beta_sd=0.02, gamma_sd=0.01)
    scaled = replace(base, beta=base.beta * 10, gamma=base.gamma * 10, noise_sd=0.02)
    small = fit_pool(pool_records(base.records(subsets, seed=2))[0]).hyper
    large = fit_pool(pool_records(scaled.records(subsets, seed=2))[0]).hyper
    assert large.tau_beta / small.tau_beta == pytest.approx(10, rel=0.05)
    assert large.tau_gamma / small.tau_gamma == pytest.approx(10, rel=0.05)
    assert large.sigma / small.sigma == pytest.approx(10, rel=0.05)

    no_pairs = replace(base, gamma=np.zeros((M, M)))
    hyper = fit_pool(pool_records(no_pairs.records(subsets, seed=2))[0]).hyper
    assert hyper.tau_gamma < 0.1 * small.tau_gamma


def test_the_misfit_scale_and_its_fall_with_k_are_estimated(pool, full_model):
    assert full_model.hyper.sigma == pytest.approx(pool.noise_sd, rel=0.3)
    assert full_model.hyper.rho == pytest.approx(pool.rho, abs=0.6)


def test_merges_that_average_every_member_keep_the_average_weights(pool, full_model):
    """A free overlap would fit the misfit here, scaling every effect: the evidence keeps 1/k,
    from every subset and from a sweep of fewer merges than parameters alike."""
    small = fit_pool(pool_records(pool.records(balanced_design(M, 4, seed=0), seed=1))[0])
    assert full_model.overlap == small.overlap == 1.0


@pytest.mark.parametrize("overlap", [0.3, 0.6])
def test_members_that_weigh_more_than_one_in_k_are_found_and_predicted(overlap: float):
    """A disjoint mean (TIES's) weighs each member more than 1/k: the fit finds by how much
    from a balanced sweep and predicts the unmerged subsets better than 1/k does."""
    pool = replace(
        synthetic_pool(M, seed=3, beta_sd=0.03, gamma_sd=0.01, strong_pairs=4), overlap=overlap
    )
    records = pool_records(pool.records(balanced_design(M, 8, seed=0), seed=1))[0]
    model = fit_pool(records)
    assert model.overlap == pytest.approx(overlap, abs=0.1)
    members = pool.members([s for s in every_subset(M) if 1 < len(s) < M])
    truth, k = pool.true_ce(members), members.sum(axis=1)
    found = within_k_r2(truth, model.predict(members).mean, k)
    held = within_k_r2(truth, fit_pool(records, overlap=1.0).predict(members).mean, k)
    assert found > 0.95 and found > held


def test_leave_one_out_predictions_equal_refits_without_the_record(balanced_model):
    """The closed form is exact at the chosen prior scales."""
    records, hyper = balanced_model.records, balanced_model.hyper
    lam_beta = (hyper.tau_beta / hyper.sigma) ** 2
    lam_gamma = (hyper.tau_gamma / hyper.sigma) ** 2
    for left_out in (3, 20, 40):
        keep = np.arange(records.ce.size) != left_out
        stats = size_stats(records.members[keep], records.ce[keep])
        equations = normal_equations(stats, balanced_model.curve, hyper.rho, hyper.overlap)
        refit = solve(equations, lam_beta, lam_gamma)
        z = balanced_model.rows(records.members[left_out : left_out + 1])
        assert (z @ refit.theta)[0] == pytest.approx(records.loo_mean[left_out], abs=1e-9)


def test_the_one_merge_of_a_size_has_no_leave_one_out_prediction(balanced_model):
    alone = balanced_model.records.k == M  # the single subset of every expert
    assert np.isnan(balanced_model.records.loo_mean[alone]).all()
    assert np.isfinite(balanced_model.records.loo_mean[~alone]).all()


def test_record_order_does_not_matter(pool):
    rows = pool.records(balanced_design(M, 6, seed=2), seed=3)
    forward = fit_pool(pool_records(rows)[0])
    backward = fit_pool(pool_records(rows[::-1])[0])
    members = pool.members([(0, 1, 2), (3, 5)])
    assert np.allclose(forward.predict(members).mean, backward.predict(members).mean, atol=1e-9)


def test_a_law_curve_predicts_sizes_the_sweep_never_measured(pool):
    rows = pool.records(balanced_design(M, 8, seed=0, ks=range(1, 6)), seed=1)
    records = pool_records(rows)[0]
    law = fit_pool(records, curve="law")
    members = pool.members([tuple(range(7)), (0, 2, 3, 4, 5, 6)])
    prediction = law.predict(members)
    assert prediction.extrapolated.all()
    assert np.abs(prediction.mean - pool.true_ce(members)).max() < 0.01
    with pytest.raises(PoolModelError, match=r"k = 6, 7 was not measured.*--curve law"):
        fit_pool(records).predict(members)


def test_the_pool_file_round_trips(tmp_path, balanced_model):
    path = tmp_path / "pool.json"
    PoolReport([balanced_model], ("method", "domain")).save(path)
    loaded = PoolReport.load(path)
    (model,) = loaded.pools
    members = np.array([[True, True, False, False, True, False, False, False]])
    assert model.predict(members).mean == pytest.approx(balanced_model.predict(members).mean)
    assert model.predict(members).hi == pytest.approx(balanced_model.predict(members).hi)
    assert model.beta == pytest.approx(balanced_model.beta)
    assert model.hyper == balanced_model.hyper
    assert np.allclose(model.covariance, balanced_model.covariance, rtol=0, atol=1e-15)
    assert model.group == balanced_model.group and loaded.by == ("method", "domain")
    assert np.array_equal(model.records.members, balanced_model.records.members)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_file_that_is_not_a_pool_file_is_refused(tmp_path):
    path = tmp_path / "fit.json"
    path.write_text('{"fits": []}')
    with pytest.raises(PoolModelError, match=r"not a pool-model file.*pool fit"):
        PoolReport.load(path)


def test_posterior_draws_match_the_intervals(balanced_model):
    draws = balanced_model.draws(4000, seed=0)
    row = design(balanced_model.curve, balanced_model.records.members[:1])[0]
    mean, var = balanced_model.linear(row)
    values = draws @ row
    lo, hi = np.quantile(values, [0.05, 0.95])
    half = balanced_model.t_value() * np.sqrt(var[0])
    assert lo == pytest.approx(mean[0] - half, abs=0.1 * half)
    assert hi == pytest.approx(mean[0] + half, abs=0.1 * half)
