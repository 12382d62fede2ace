"""Every bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hf_mergelaw.errors import FitError, LawError, RecordsError
from hf_mergelaw.law import fit_law, fit_sweep, load_records
from tests.law_data import paper_sweep


def _rows(ks, n=None):
    return [{"k": k, "ce": 0.5 + 0.1 / k, **({} if n is None else {"N": n})} for k in ks]


def test_fewer_cells_than_parameters() -> None:
    with pytest.raises(FitError, match=r"2 \(N, k\) cells for 3 parameters.*--form per-size"):
        fit_law(_rows([1, 2]), "per-size")


def test_one_k_value() -> None:
    with pytest.raises(FitError, match=r"only one k value \(k=3\).*add them, or drop"):
        fit_law(_rows([3, 3, 3]), "per-size")
    records = [*_rows([1, 2, 3, 4]), {"k": 2, "ce": 0.6, "method": "ties"}]
    for r in records[:4]:
        r["method"] = "average"
    report = fit_sweep(records, "per-size", by=("method",))
    assert [f.group for f in report.fits] == [{"method": "average"}]
    assert report.failed[0]["group"] == {"method": "ties"}
    assert "group method=ties: only one k value" in report.failed[0]["error"]


def test_a_group_that_cannot_be_fitted_leaves_the_others_and_is_written(tmp_path) -> None:
    records = [*_rows([1, 2, 3, 4]), {"k": 2, "ce": 0.6, "method": "ties"}]
    for r in records[:4]:
        r["method"] = "average"
    out = tmp_path / "fit.json"
    fit_sweep(records, "per-size", by=("method",)).save(out)
    saved = json.loads(out.read_text())
    assert [f["group"] for f in saved["fits"]] == [{"method": "average"}]
    assert saved["failed"][0]["group"] == {"method": "ties"}


def test_when_no_group_can_be_fitted_it_is_an_error() -> None:
    records = [{"k": 2, "ce": 0.6, "method": m} for m in ("ties", "average")]
    with pytest.raises(FitError, match="no group could be fitted"):
        fit_sweep(records, "per-size", by=("method",))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"k": 2, "ce": math.nan}, "ce is NaN or infinite"),
        ({"k": 2, "ce": -0.3}, "ce is negative"),
        ({"k": 0, "ce": 0.3}, "k < 1"),
    ],
)
def test_bad_rows_are_counted_or_refused(bad, reason) -> None:
    records = load_records([*_rows(range(1, 6)), bad])
    assert records.dropped == {reason: 1}
    assert fit_sweep(records, "per-size").dropped == {reason: 1}
    with pytest.raises(RecordsError, match=f"strict mode.*1 {reason}"):
        fit_sweep([*_rows(range(1, 6)), bad], "per-size", strict=True)


def test_non_convergence() -> None:
    records = paper_sweep("average", "code", sizes=(0.5, 3.0, 7.0), seed=0)
    with pytest.raises(
        FitError, match=r"did not converge.*within 2 function evaluations.*--loss huber"
    ):
        fit_law(records, "joint", max_nfev=2)


def test_joint_needs_sizes() -> None:
    with pytest.raises(FitError, match=r"carry no N.*--form per-size"):
        fit_law(_rows(range(1, 10)), "joint")
    two_sizes = _rows(range(1, 10), 1.0) + _rows(range(1, 10), 7.0)
    with pytest.raises(FitError, match=r"at least 3 base sizes.*got 2"):
        fit_law(two_sizes, "joint")
    with pytest.raises(FitError, match=r"2 sizes in one group.*fit_sweep groups by N"):
        fit_law(two_sizes, "per-size")


def test_variance_law_needs_repeated_subsets() -> None:
    with pytest.raises(FitError, match="at least two subsets"):
        fit_law(_rows(range(1, 10), 7.0), "variance-per-size")


def test_bad_options() -> None:
    records = _rows(range(1, 6))
    with pytest.raises(LawError, match="weights must be one of"):
        fit_law(records, "per-size", weights="sqrt")
    with pytest.raises(LawError, match="loss must be one of"):
        fit_law(records, "per-size", loss="cauchy")
    with pytest.raises(LawError, match=r"level must lie in \(0, 1\)"):
        fit_law(records, "per-size", level=90)
    with pytest.raises(FitError, match="inverse-variance weights need"):
        fit_law(records, "per-size", weights="inverse-variance")


def test_prediction_outside_a_per_size_fit() -> None:
    fit = fit_law(_rows(range(1, 6), 7.0), "per-size")
    assert fit.group == {"N": 7.0}
    with pytest.raises(LawError, match="N=7; it cannot predict other sizes"):
        fit.predict(72, np.arange(1, 4))
    joint = fit_law(paper_sweep("average", "code", sizes=(0.5, 3.0, 7.0)), "joint")
    with pytest.raises(LawError, match="needs N"):
        joint.predict(None, 3)
