"""The pool model from the pool's geometry: exactly the second-order expansion, no interval until
merges calibrate it, and a calibration that fixes what the expansion misses.

Geometries are built by hand here: a loss exactly quadratic in the weights (linear regression
with squared error), where the expansion is exact, and random terms with a known level error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from hf_mergelaw.pool_model import (
    PoolGeometry,
    PoolModelError,
    PoolRecords,
    PoolReport,
    calibrate,
    calibration_subsets,
    geometry_model,
    pool_curve,
    pool_law,
    select,
)
from hf_mergelaw.pool_model.search import all_members

NAMES = ("a", "b", "c", "d", "e", "f")
GROUP = {"method": "average", "domain": "macro"}


def every_subset(m: int) -> np.ndarray:
    return np.concatenate([all_members(m, k) for k in range(1, m + 1)])


@pytest.fixture(scope="module")
def regression() -> tuple[PoolGeometry, Callable[[np.ndarray], np.ndarray]]:
    """L(w) = |X w - y|^2 / n around w0 with six task vectors, and L itself."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 12)), rng.normal(size=40)
    w0, u = rng.normal(size=12), 0.5 * rng.normal(size=(len(NAMES), 12))

    def loss(w: np.ndarray) -> float:
        return float(np.mean((x @ w - y) ** 2))

    gradient = 2 * x.T @ (x @ w0 - y) / len(y)
    hessian = 2 * x.T @ x / len(y)
    geometry = PoolGeometry(NAMES, loss(w0), u @ gradient, u @ hessian @ u.T)
    return geometry, lambda members: np.array([loss(w0 + u[row].mean(axis=0)) for row in members])


@pytest.fixture(scope="module")
def random_geometry() -> PoolGeometry:
    rng = np.random.default_rng(1)
    u = 0.3 * rng.normal(size=(len(NAMES), 30))
    h = np.diag(rng.uniform(0.5, 2.0, 30))
    return PoolGeometry(NAMES, 3.0, u @ rng.normal(size=30) * 0.1, u @ h @ u.T)


def test_a_quadratic_loss_is_predicted_exactly_for_every_subset(regression) -> None:
    geometry, measured = regression
    members = every_subset(len(NAMES))
    model = geometry_model(GROUP, geometry)
    np.testing.assert_allclose(model.predict(members).mean, measured(members), rtol=1e-12)
    np.testing.assert_allclose(geometry.predict(members), measured(members), rtol=1e-12)


def test_the_pool_curve_is_the_law_with_b_zero(random_geometry) -> None:
    model = geometry_model(GROUP, random_geometry)
    q, m = random_geometry.curvature, len(NAMES)
    off = (q.sum() - np.trace(q)) / (m * (m - 1))
    law = pool_law(model)
    assert law["b"] == 0.0
    assert law["L_inf"] == pytest.approx(3.0 + random_geometry.gradient.mean() + off / 2)
    assert law["A"] == pytest.approx((np.trace(q) / m - off) / 2)
    for point in pool_curve(model):
        subsets = all_members(m, point.k)
        assert point.mean == pytest.approx(random_geometry.predict(subsets).mean())
        assert point.spread == pytest.approx(random_geometry.predict(subsets).std(), rel=1e-6)


def test_without_calibration_nothing_claims_a_certainty_it_does_not_have(random_geometry) -> None:
    model = geometry_model(GROUP, random_geometry, approximate=True)
    prediction = model.predict([("a", "b")])
    assert not model.has_intervals
    assert np.isnan(prediction.lo).all() and np.isnan(prediction.hi).all()
    assert all(np.isnan(s.p_best) and np.isnan(s.lo) for s in select(model, 2, top=2))
    point = pool_curve(model)[1]
    assert np.isnan([point.lo, point.hi, point.spread_lo, point.spread_hi]).all()
    assert "second-order" in model.source["note"] and "sign election" in model.source["note"]


def test_a_geometry_pool_file_reads_back_the_same(tmp_path, random_geometry) -> None:
    model = geometry_model(GROUP, random_geometry, curvature="ggn")
    PoolReport([model], by=("method", "domain")).save(tmp_path / "pool.json")
    back = PoolReport.load(tmp_path / "pool.json").pools[0]
    members = every_subset(len(NAMES))
    np.testing.assert_allclose(back.predict(members).mean, model.predict(members).mean)
    assert back.source == model.source and not back.has_intervals


def test_calibration_subsets_start_with_every_expert_alone() -> None:
    chosen = calibration_subsets(NAMES, 12)
    assert chosen[:6] == [(name,) for name in NAMES]
    assert chosen[6] == NAMES
    assert len(chosen) == len(set(chosen)) == 12
    assert {len(s) for s in chosen} == {1, 2, 3, 6}


@pytest.mark.parametrize("n", [3, 6, 60])
def test_calibration_counts_the_pool_cannot_hold_are_refused(n: int) -> None:
    with pytest.raises(PoolModelError, match="--calibrate"):
        calibration_subsets(NAMES, n)


def _measured(geometry: PoolGeometry, subsets, noise: float, seed: int = 0) -> PoolRecords:
    """Merges whose CE is the expansion plus a level it misses (0.05 + 0.1/k) and noise."""
    members = np.array([[name in s for name in NAMES] for s in subsets])
    k = members.sum(axis=1)
    rng = np.random.default_rng(seed)
    ce = geometry.predict(members) + 0.05 + 0.1 / k + noise * rng.normal(size=k.size)
    return PoolRecords(dict(GROUP), NAMES, members, ce, tuple(range(len(subsets))))


def test_calibration_recovers_the_level_the_expansion_misses(random_geometry) -> None:
    prior = geometry_model(GROUP, random_geometry)
    model = calibrate(prior, _measured(random_geometry, calibration_subsets(NAMES, 12), 1e-4))
    members = every_subset(len(NAMES))
    k = members.sum(axis=1)
    truth = random_geometry.predict(members) + 0.05 + 0.1 / k
    assert np.max(np.abs(model.predict(members).mean - truth)) < 5e-3
    assert np.max(np.abs(prior.predict(members).mean - truth)) > 0.06
    summary = model.source["calibration"]
    assert summary["merges"] == 12 and summary["sizes"] == [1, 2, 3, 6]
    assert summary["shift"]["1"] == pytest.approx(0.15, abs=1e-3)
    assert summary["fitted_rmse"] < summary["prior_rmse"] / 10
    assert model.has_intervals and model.warnings == []


def test_merges_far_from_the_expansion_are_warned_of(random_geometry) -> None:
    prior = geometry_model(GROUP, random_geometry)
    subsets = calibration_subsets(NAMES, 12)
    records = _measured(random_geometry, subsets, 0.0)
    # Each expert alone lands where the expansion says it would not: a change of the opposite
    # sign to what is predicted.
    singles = records.k == 1
    base = random_geometry.loss
    flipped = records.ce.copy()
    flipped[singles] = base - 3 * (records.ce[singles] - base)
    model = calibrate(
        prior, PoolRecords(records.group, NAMES, records.members, flipped, records.lines)
    )
    assert any("too large for its regime" in w for w in model.warnings)


def test_calibration_needs_two_sizes_of_the_same_pool(random_geometry) -> None:
    prior = geometry_model(GROUP, random_geometry)
    singles = _measured(random_geometry, [(name,) for name in NAMES], 1e-3)
    with pytest.raises(PoolModelError, match="one size"):
        calibrate(prior, singles)
    other = PoolRecords(singles.group, tuple("uvwxyz"), singles.members, singles.ce, singles.lines)
    with pytest.raises(PoolModelError, match="same pool"):
        calibrate(prior, other)


def test_geometry_of_mismatched_shapes_is_refused() -> None:
    with pytest.raises(PoolModelError, match="shape"):
        PoolGeometry(NAMES, 1.0, np.zeros(5), np.zeros((6, 6)))
