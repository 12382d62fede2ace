"""A fit says what the data did not decide: finite pools, bound-pinned parameters, held-out
forecasts, lack of fit, and groups that cannot be fitted."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hf_mergelaw.law import fit_law, fit_sweep, plan
from tests.law_data import paper_sweep


def additive_pool(m: int, seed: int = 0, tail: float = 0.1) -> list[dict]:
    """Every subset of a pool whose merges add per-expert effects: no noise at all."""
    effects = np.random.default_rng(seed).normal(0, 0.05, m)
    names = [f"e{i}" for i in range(m)]
    return [
        {"k": k, "ce": 2.0 + tail / k + float(effects[list(s)].mean()),
         "subset": [names[i] for i in s]}
        for k in range(1, m + 1)
        for s in itertools.combinations(range(m), k)
    ]  # fmt: skip


def test_the_pool_size_comes_from_the_records_subsets() -> None:
    assert fit_law(additive_pool(6), "per-size").pool_size == 6


def test_the_finite_pool_variance_form_matches_enumeration() -> None:
    m = 9
    records = additive_pool(m)
    s2 = np.var([r["ce"] for r in records if r["k"] == 1])  # the effects' spread, divisor m
    ce = {k: [r["ce"] for r in records if r["k"] == k] for k in range(1, m)}
    for k, values in ce.items():  # the cell variance over all C(m, k) subsets
        n = len(values)
        assert np.var(values, ddof=1) == pytest.approx(s2 * (m - k) / ((m - 1) * k) * n / (n - 1))
    variance = fit_law(records, "per-size").variance
    assert variance.params["V_inf"] < 0 and variance.r2 > 0.98  # the intercept below zero
    predicted = variance.predict(None, np.array([1.0, m - 1.0])).mean
    observed = [np.var(ce[1], ddof=1), np.var(ce[m - 1], ddof=1)]
    np.testing.assert_allclose(predicted, observed, rtol=0.12)


def curve(a: float, b: float, d: float = 0.0, q: float = 1.0, noise: float = 0.0) -> list[dict]:
    """``2 + a/(k+b) + d k/(k+q)`` at k = 1..9, three subsets per k (of method ties)."""
    return [
        {"k": k, "ce": 2.0 + a / (k + b) + d * k / (k + q) + noise * (s - 1), "method": "ties",
         "subset": [f"e{(k + s + i) % 9}" for i in range(k)]}
        for k in range(1, 10)
        for s in range(3)
    ]  # fmt: skip


def test_a_parameter_on_its_bound_is_named_and_plans_resting_on_it_are_flagged() -> None:
    slow = curve(0.05, 8.0, noise=0.0005)  # bends less than 1/(k+5) allows: b goes to its cap
    fit = fit_sweep(slow, "per-size", by=("method",)).fits[0]
    assert fit.pinned.get("b") == "upper"
    assert any("b = 5 sits on its upper bound" in w for w in fit.warnings)
    assert any("--form ties-per-size" in w for w in fit.warnings)
    warnings = plan(fit, min_gain=0.001)[0].warnings
    assert any(w.startswith("k90 rests on b") for w in warnings)
    assert any(w.startswith("k_stop rests on") for w in warnings)


def test_the_ties_form_fits_the_papers_rising_term() -> None:
    rising = curve(0.08, 0.2, d=0.01, q=3.0)
    fit = fit_law(rising, "ties-per-size")
    assert fit.params["D"] == pytest.approx(0.01, rel=1e-3) and fit.r2 > 0.9999
    assert fit_law(rising, "per-size").r2 < fit.r2


def test_answers_beyond_the_pool_are_flagged() -> None:
    fit = fit_law(additive_pool(4, tail=0.4), "per-size")
    target = fit.params["L_inf"] + 0.1 * fit.params["A"] / (10 + fit.params["b"])
    (answer,) = plan(fit, target_loss=target)
    assert answer.k_for_target > 4
    assert any("needs more experts than the pool has (4)" in w for w in answer.warnings)
    assert answer.pool_size == 4 and answer.population_floor > answer.L_inf


def test_leave_one_k_out_forecasts_the_largest_k_from_the_others() -> None:
    records = paper_sweep("average", "code", sizes=(7.0,), seed=0)  # cells exactly on the law
    check = fit_law(records, "per-size").checks["leave_out_k"]
    assert check["held_out"] == "k=9" and check["max_rel_error"] < 1e-6


def test_leave_one_size_out_forecasts_the_largest_size_of_a_joint_fit() -> None:
    records = paper_sweep("average", "code", sizes=(0.5, 1.5, 3.0, 7.0), seed=0)
    check = fit_law(records, "joint").checks["leave_out_size"]
    assert check["held_out"] == "N=7" and check["cells"] == 9 and check["max_rel_error"] < 1e-4


def test_lack_of_fit_is_small_for_the_law_and_large_for_another_shape() -> None:
    law_data = paper_sweep("average", "code", sizes=(14.0,), subsets=6, seed=3)
    assert fit_law(law_data, "per-size").checks["lack_of_fit"]["p_value"] > 0.01
    curved = [{**r, "ce": r["ce"] + 0.02 * np.sin(r["k"])} for r in law_data]
    assert fit_law(curved, "per-size").checks["lack_of_fit"]["p_value"] < 1e-3


def test_a_weakly_identified_joint_fit_still_converges() -> None:
    # Before variable projection this sweep stopped every start at scipy's evaluation limit.
    records = paper_sweep("ties", "geometry", seed=56, scatter="population")
    fit = fit_law(records, "joint", variance=False)
    assert np.isfinite(fit.r2) and fit.warnings  # on its bounds, and it says so


@pytest.mark.parametrize("scatter", ["pool", "independent", "population"])
def test_every_scatter_setting_generates_the_law_on_average(scatter: str) -> None:
    records = paper_sweep("average", "algebra", sizes=(7.0,), scatter=scatter, seed=1)
    ks = np.array([r["k"] for r in records])
    assert {1, 9} <= set(ks) and len(records) == 511
