"""JSON round trip of fits: everything predict and plan need survives save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_mergelaw.errors import FormulaError
from hf_mergelaw.law import FitReport, FitResult, Law, fit_law, fit_sweep, plan
from tests.law_data import paper_sweep


def _same_predictions(a: FitResult, b: FitResult, n: float | None) -> None:
    ks = np.arange(1, 10)
    pa, pb = a.predict(n, ks), b.predict(n, ks)
    for field in ("mean", "lo", "hi", "pi_lo", "pi_hi"):
        np.testing.assert_array_equal(getattr(pa, field), getattr(pb, field))
    assert (pa.ci_source, pa.pi_source) == (pb.ci_source, pb.pi_source)


def test_report_round_trip(tmp_path: Path) -> None:
    records = paper_sweep("ties", "code", sizes=(0.5, 3.0, 7.0, 14.0), seed=0)
    records.append({"k": 1, "ce": float("nan"), "N": 3.0, "method": "ties", "domain": "code"})
    report = fit_sweep(records, "joint", by=("method", "domain"), bootstrap=20, seed=1)
    path = tmp_path / "fit.json"
    report.save(path)
    data = json.loads(path.read_text())
    fit_json = data["fits"][0]
    assert data["dropped"] == {"ce is NaN or infinite": 1}
    assert fit_json["group"] == {"method": "ties", "domain": "code"}
    assert set(fit_json["params"]) == {"L_star", "B", "beta", "A0", "gamma", "b"}
    assert set(fit_json["variance"]["params"]) == {
        "V_star",
        "B_v",
        "beta_v",
        "A0_v",
        "gamma_v",
        "b_v",
    }
    for key in ("ci", "r2", "rmse", "n_points", "n_cells", "form", "stderr", "cells"):
        assert key in fit_json
    loaded = FitReport.load(path)
    assert loaded.to_dict() == report.to_dict()
    _same_predictions(report.fits[0], loaded.fits[0], 72.0)
    assert plan(loaded.fits[0], N=72, target_loss=0.33) == plan(
        report.fits[0], N=72, target_loss=0.33
    )


def test_formula_and_per_size_round_trip() -> None:
    records = paper_sweep("average", "algebra", sizes=(7.0,), seed=0)
    fit = fit_law(records, "c + a / (k + b)", params={"c": None, "a": (0, None), "b": (0, 5)})
    restored = FitResult.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert restored.law.kind == "formula" and restored.law.lower[1] == 0.0
    _same_predictions(fit, restored, 7.0)
    per_size = fit_law(records, "per-size")
    _same_predictions(per_size, FitResult.from_dict(per_size.to_dict()), None)


def test_callable_law_needs_the_function_back() -> None:
    def law(k, c, a):
        return c + a / k

    callable_law = Law.from_callable(law, {"c": None, "a": (0, None)})
    fit = fit_law([{"k": k, "ce": 1 + 0.5 / k} for k in range(1, 6)], callable_law)
    data = json.loads(json.dumps(fit.to_dict()))
    with pytest.raises(FormulaError, match="callable_law"):
        FitResult.from_dict(data)
    _same_predictions(fit, FitResult.from_dict(data, callable_law), None)
