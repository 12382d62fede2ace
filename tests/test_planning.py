"""Planning: closed forms against brute force, the three-point recipe, plans with intervals, and
the size-versus-experts trade-off."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_mergelaw.errors import PlanningError
from hf_mergelaw.law import (
    CostModel,
    fit_law,
    gain_fraction,
    k_eps,
    k_for_fraction,
    k_for_target,
    k_stop,
    marginal_gain,
    plan,
    size_vs_experts,
    three_point_recipe,
)
from hf_mergelaw.law.paper import MERGE_SECONDS_9, PAPER_SIZES, joint_fits
from hf_mergelaw.law.synthetic import joint_mean
from tests.law_data import paper_sweep

K_RANGE = np.arange(1, 200_001, dtype=float)
floors = st.floats(0.0, 2.0)
tails = st.floats(1e-4, 1.0)
offsets = st.floats(0.0, 5.0)


def _first(mask: np.ndarray) -> float:
    return float(K_RANGE[np.argmax(mask)]) if mask.any() else np.inf


@settings(max_examples=150, deadline=None)
@given(floors, tails, offsets, st.floats(1e-3, 0.5))
def test_k_for_target_is_the_first_k_reaching_the_target(floor, a, b, gap) -> None:
    target = floor + gap
    k = float(k_for_target(floor, a, b, target))
    brute = _first(floor + a / (K_RANGE + b) <= target)
    # Equal, or off by one only where L(k) sits on the target up to rounding.
    assert k == brute or abs(floor + a / (min(k, brute) + b) - target) < 1e-12
    assert np.isinf(k_for_target(floor, a, b, floor))
    assert np.isinf(k_for_target(floor, a, b, floor - gap))


@settings(max_examples=150, deadline=None)
@given(tails, offsets, st.floats(1e-4, 0.1))
def test_k_eps_and_k_stop_match_brute_force(a, b, eps) -> None:
    ke = float(k_eps(a, b, eps))
    brute_e = _first(a / (K_RANGE + b) <= eps)
    assert ke == brute_e or abs(a / (min(ke, brute_e) + b) - eps) < 1e-12
    tau = eps / 10
    ks = float(k_stop(a, b, tau))
    gains = marginal_gain(K_RANGE, a, b)
    brute_s = _first(gains < tau)
    assert ks == brute_s or abs(marginal_gain(min(ks, brute_s), a, b) - tau) < 1e-12
    # The marginal gain is the drop of the per-size law from k to k + 1.
    law = a / (K_RANGE[:5] + b)
    np.testing.assert_allclose(gains[:5], law[:5] - a / (K_RANGE[1:6] + b))


@settings(max_examples=150, deadline=None)
@given(offsets, st.sampled_from([0.5, 0.8, 0.9, 1.0]), st.integers(2, 20))
def test_k_for_fraction_matches_brute_force(b, frac, k_max) -> None:
    k = int(k_for_fraction(frac, b, k_max))
    # The smallest k whose gain fraction reaches frac (up to rounding at exact ties).
    assert gain_fraction(k, b, k_max) >= frac - 1e-9
    assert k == 1 or gain_fraction(k - 1, b, k_max) < frac + 1e-9
    assert gain_fraction(k_max, b, k_max) == pytest.approx(1.0)


def test_k90_is_5_or_6_for_average_and_task_arithmetic() -> None:
    """Paper: k90 in {5, 6} for K = 9."""
    for (method, _), p in joint_fits().items():
        if method != "ties":
            assert int(k_for_fraction(0.9, p["b"])) in (5, 6)


def test_three_point_exact_solve_and_clamp() -> None:
    f = three_point_recipe(*(0.4 + 0.12 / (np.array([1, 2, 4]) + 0.7)))
    assert (f.L_inf, f.A, f.b, f.clamped) == pytest.approx((0.4, 0.12, 0.7, False))
    assert f.forecast == pytest.approx(0.4 + 0.12 / 9.7)
    # r > 2 means a negative b: clamp at 0 and refit L_inf and A by weighted least squares.
    y = 0.5 + 0.1 / np.array([1.0, 2.0, 4.0]) + np.array([0.004, 0.0, 0.0])
    clamped = three_point_recipe(*y)
    assert clamped.clamped and clamped.b == 0.0
    w = np.array([1.0, 2.0, 4.0])
    design = np.column_stack([np.ones(3), 1 / w]) * np.sqrt(w)[:, None]
    expected, *_ = np.linalg.lstsq(design, y * np.sqrt(w), rcond=None)
    assert (clamped.L_inf, clamped.A) == pytest.approx(tuple(expected))
    with pytest.raises(PlanningError, match="must decrease"):
        three_point_recipe(0.5, 0.55, 0.4)
    with pytest.raises(PlanningError, match="must decrease"):
        three_point_recipe(0.5, 0.45, 0.35)  # linear in k: r = 1/2, no 1/(k+b) tail


@pytest.mark.parametrize("key", sorted(joint_fits()))
def test_three_point_forecasts_k9_within_one_percent(key: tuple[str, str]) -> None:
    """Cells holding every combination of the pool, as the paper's sweeps up to 7B."""
    fit = fit_law(paper_sweep(*key, subsets="all", seed=0), "joint", variance=False)
    for p in plan(fit):
        tp = p.three_point
        assert tp is not None and tp.k == 9
        assert tp.rel_error < 0.01
        assert abs(tp.forecast / joint_mean(joint_fits()[key], p.N, 9) - 1) < 0.01


@pytest.mark.parametrize("key", [("average", "biology"), ("ties", "code")])
def test_three_point_within_one_percent_on_balanced_sampled_cells(key: tuple[str, str]) -> None:
    """18 balanced subsets per cell (18 * k a multiple of the 9 experts at k = 1, 2, 4): each
    expert's own effect cancels from the cell means, and the forecast is as good as with every
    combination, at every size, for the noisiest variance fit (biology) too. (Uniform draws of
    18 miss by up to 3% here. The synthetic scatter is purely additive, so balance is exact;
    real merges keep a pairwise part, see benchmarks/subset_design.py.)"""
    fit = fit_law(paper_sweep(*key, subsets=18, design="balanced", seed=1), "joint")
    for p in plan(fit):
        assert abs(p.three_point.forecast / joint_mean(joint_fits()[key], p.N, 9) - 1) < 0.01


def test_three_point_interval_on_sampled_subsets() -> None:
    """With 15 sampled subsets per cell the forecast is noisier: its Monte Carlo interval
    reflects that and covers the measured k = 9 mean, and sizes whose noisy means do not
    decrease get a note instead of a forecast."""
    hits, skipped = [], 0
    for seed in range(6):
        fit = fit_law(paper_sweep("average", "algebra", subsets=15, seed=seed), "joint")
        for p in plan(fit):
            if p.three_point is None:
                assert "three-point recipe" in p.notes[0]
                skipped += 1
                continue
            lo, hi = p.three_point.forecast_ci
            hits.append(lo <= p.three_point.observed <= hi)
    assert np.mean(hits) >= 0.75
    assert skipped < len(hits)


@pytest.fixture(scope="module")
def code_fit():
    return fit_law(paper_sweep("average", "code", seed=0), "joint", bootstrap=60, seed=0)


def test_plan_answers_match_the_fitted_curve(code_fit) -> None:
    (p,) = plan(code_fit, N=72, target_loss=0.33, eps=0.004, min_gain=0.002)
    ks = np.arange(1, 500)
    curve = code_fit.predict(72.0, ks).mean
    assert p.k_for_target == ks[np.argmax(curve <= 0.33)]
    assert p.k_eps == ks[np.argmax(curve - p.L_inf <= 0.004)]
    assert (
        p.k_stop == ks[np.argmax(-np.diff(np.append(curve, p.L_inf + p.A / (500 + p.b))) < 0.002)]
    )
    for name in ("k_for_target", "k_eps", "k_stop", "k80", "k90"):
        lo, hi = getattr(p, f"{name}_ci")
        assert lo <= getattr(p, name) <= (np.inf if hi is None else hi), name  # None: unbounded
    assert p.marginal_gain == pytest.approx(list(-np.diff(curve[:9])))


def test_plan_target_below_floor_and_other_sizes(code_fit) -> None:
    (p,) = plan(code_fit, N=72, target_loss=0.1)
    assert p.k_for_target is None
    assert "at or below the floor" in p.notes[0]
    assert [q.N for q in plan(code_fit)] == list(PAPER_SIZES)
    per_size = fit_law(paper_sweep("average", "code", sizes=(7.0,), seed=0), "per-size")
    assert plan(per_size, N=72) == []
    with pytest.raises(PlanningError, match="per-size or joint"):
        plan(fit_law(paper_sweep("average", "code", sizes=(7.0,)), "free-exponent"))


def test_merge_time_cost_model() -> None:
    model = CostModel.merge_time("ties")
    np.testing.assert_allclose(model.cost(np.array(PAPER_SIZES), 9), MERGE_SECONDS_9["ties"])
    between = model.cost(10.0, 9)
    assert MERGE_SECONDS_9["ties"][3] < between < MERGE_SECONDS_9["ties"][4]
    assert model.cost(144.0, 9) > MERGE_SECONDS_9["ties"][-1]
    assert CostModel.from_dict(model.to_dict()).cost(20.0, 3) == pytest.approx(model.cost(20.0, 3))
    with pytest.raises(PlanningError, match="no merge-time table"):
        CostModel.merge_time("slerp")


def test_size_versus_experts_against_brute_force(code_fit) -> None:
    model = CostModel(base={0.5: 1.0, 72.0: 144.0}, per_expert=2.0, unit="GPU-h")
    result = size_vs_experts(code_fit, model, target_loss=0.36, budget=60.0)
    options = result.options
    assert len(options) == len(PAPER_SIZES) * 9
    reaching = [o for o in options if o.mean <= 0.36]
    assert result.cheapest == min(reaching, key=lambda o: (o.cost, o.mean))
    confident = [o for o in options if o.hi <= 0.36]
    assert result.cheapest_confident == min(confident, key=lambda o: (o.cost, o.mean))
    affordable = [o for o in options if o.cost <= 60.0]
    assert result.best_within_budget == min(affordable, key=lambda o: (o.mean, o.cost))
    default = size_vs_experts(code_fit, budget=500.0)
    assert default.unit == "merge seconds (average)"
    slerp = fit_law(paper_sweep("ties", "code", seed=0), "joint", group={"method": "slerp"})
    assert "no merge-time table for method 'slerp'" in size_vs_experts(slerp).notes[0]
    per_size = fit_law(paper_sweep("average", "code", sizes=(7.0,)), "per-size")
    with pytest.raises(PlanningError, match="--form joint"):
        size_vs_experts(per_size)
