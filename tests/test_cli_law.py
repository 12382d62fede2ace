"""`hf-mergelaw fit / predict / plan / plot` end to end, and their error handling.

Values are checked on the ``--json`` output; one test per command checks that the human table
names the key quantities, without pinning its layout.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mergelaw.cli import main
from tests.law_data import paper_sweep

REPO = Path(__file__).resolve().parents[1]
SIZES = (0.5, 1.5, 3.0, 7.0, 14.0)
PLAN_ARGS = ["--target-loss", "0.34", "--min-gain", "0.002", "--eps", "0.005"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = paper_sweep("average", "code", sizes=SIZES, seed=0)
    rows += paper_sweep("ties", "code", sizes=SIZES, seed=1)
    path = tmp_path_factory.mktemp("cli") / "sweep.jsonl"
    lines = [json.dumps(r) for r in rows] + ['{"k": 0, "ce": 0.5, "N": 7}']
    path.write_text("\n".join(lines) + "\n{truncated")  # a last record still being written
    return path


@pytest.fixture(scope="module")
def fit_file(sweep: Path) -> Path:
    out = sweep.with_name("fit.json")
    assert (
        main(["fit", str(sweep), "--by", "method,domain", "--bootstrap", "30", "-o", str(out)]) == 0
    )
    return out


@pytest.fixture(scope="module")
def per_size_fit_file(sweep: Path) -> Path:
    out = sweep.with_name("per_size.json")
    assert main(["fit", str(sweep), "--form", "per-size", "-o", str(out)]) == 0
    return out


def _json_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _table_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


# --- fit ------------------------------------------------------------------------------------


def test_fit_writes_the_documented_json(fit_file: Path) -> None:
    data = json.loads(fit_file.read_text())
    assert [f["group"] for f in data["fits"]] == [
        {"method": "average", "domain": "code"},
        {"method": "ties", "domain": "code"},
    ]
    fit = data["fits"][0]
    assert fit["form"] == "joint"
    assert list(fit["params"]) == ["L_star", "B", "beta", "A0", "gamma", "b"]
    assert all(len(fit["ci"][name]) == 2 for name in fit["params"])
    assert fit["r2"] > 0.99 and fit["rmse"] > 0 and fit["n_points"] > 1000
    assert data["dropped"] == {"k < 1": 1}
    assert not list(fit_file.parent.glob(".*.tmp"))


def test_fit_per_size_makes_one_fit_per_group_and_size(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _json_out(capsys, ["fit", str(sweep), "--form", "per-size", "--by", "method", "--json"])
    groups = [(f["group"]["method"], f["group"]["N"]) for f in data["fits"]]
    assert sorted(groups) == sorted((m, n) for m in ("average", "ties") for n in SIZES)
    assert {f["form"] for f in data["fits"]} == {"per-size"}
    assert all(list(f["params"]) == ["L_inf", "A", "b"] for f in data["fits"])


def test_fit_warns_on_stderr_about_dropped_records(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["fit", str(sweep), "--form", "per-size", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "warning: dropped 1 of" in err and "1 k < 1" in err
    assert json.loads(out)["dropped"] == {"k < 1": 1}  # stdout holds the JSON alone


def test_fit_table_names_groups_and_parameters(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _table_out(capsys, ["fit", str(sweep), "--form", "per-size", "--by", "method"])
    assert "method=ties,N=14" in out and "per-size" in out
    for name in ("L_inf", "90% CI", "R^2"):
        assert name in out


def test_fit_accepts_a_formula_with_declared_parameters(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fit", str(sweep), "--by", "method", "--form", "L = c + B * N**-e + a / (k + b)"]
    params = ["--param", "c=0:2", "--param", "B=0:", "--param", "e=0:3", "--param", "a=0:"]
    data = _json_out(capsys, [*argv, *params, "--param", "b=0:5:0.5", "--json"])
    assert set(data["fits"][0]["params"]) == {"c", "B", "e", "a", "b"}
    assert data["fits"][0]["r2"] > 0.99


# --- predict --------------------------------------------------------------------------------


def test_predict_gives_a_row_per_group_and_k(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _json_out(capsys, ["predict", str(fit_file), "--N", "72", "--k", "1-9", "--json"])
    rows = data["predictions"]
    assert [(r["group"]["method"], r["k"]) for r in rows] == [
        (method, k) for method in ("average", "ties") for k in range(1, 10)
    ]
    assert {(r["N"], r["level"]) for r in rows} == {(72.0, 0.9)}


def test_predict_rows_nest_the_mean_interval_inside_the_prediction_interval(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _json_out(capsys, ["predict", str(fit_file), "--N", "72", "--k", "1-9", "--json"])
    for row in data["predictions"]:
        assert set(row) >= {"group", "N", "k", "mean", "lo", "hi", "pi_lo", "pi_hi"}
        assert row["pi_lo"] <= row["lo"] < row["mean"] < row["hi"] <= row["pi_hi"]


def test_predict_group_option_keeps_only_that_group(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", str(fit_file), "--N", "7", "--k", "2,4", "--group", "method=ties", "--json"]
    data = _json_out(capsys, argv)
    assert [(r["group"]["method"], r["k"]) for r in data["predictions"]] == [
        ("ties", 2),
        ("ties", 4),
    ]


def test_predict_table_names_groups_and_intervals(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _table_out(capsys, ["predict", str(fit_file), "--N", "72", "--k", "9"])
    assert "method=average,domain=code" in out and "method=ties,domain=code" in out
    for name in ("mean", "pi_lo", "pi_hi"):
        assert name in out


# --- plan -----------------------------------------------------------------------------------


def test_plan_answers_every_planning_question(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _json_out(capsys, ["plan", str(fit_file), *PLAN_ARGS, "--N", "72", "--json"])
    plan = data["plans"][0]
    for key in ("group", "k_for_target", "k_stop", "k_eps", "k80", "k90", "k_for_target_ci"):
        assert key in plan
    assert plan["N"] == 72.0 and plan["k90"] in (5, 6, 7)


def test_plan_tradeoff_uses_the_cost_model_file_and_budget(
    fit_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"base": {"0.5": 1, "72": 100}, "per_expert": 2, "unit": "GPU-h"}))
    argv = ["plan", str(fit_file), *PLAN_ARGS, "--N", "72", "--budget", "150"]
    data = _json_out(capsys, [*argv, "--cost-model", str(cost), "--json"])
    trade = data["tradeoffs"][0]
    assert trade["unit"] == "GPU-h" and trade["best_within_budget"]["cost"] <= 150


def test_plan_target_below_the_floor_has_no_k_for_target(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", str(fit_file), "--target-loss", "0.01", "--N", "72", "--json"]
    data = _json_out(capsys, argv)
    assert data["plans"][0]["k_for_target"] is None


def test_plan_at_a_fitted_size_has_a_stop_rule_and_three_point_forecast(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _json_out(capsys, ["plan", str(fit_file), *PLAN_ARGS, "--N", "7", "--json"])
    plan = data["plans"][0]
    assert isinstance(plan["k_stop"], int) and 1 <= plan["k_stop"] <= 9
    three_point = plan["three_point"]
    assert three_point["k"] == 9
    assert math.isfinite(three_point["forecast"]) and three_point["observed"] is not None


def test_plan_table_names_groups_and_answers(
    fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _table_out(capsys, ["plan", str(fit_file), *PLAN_ARGS, "--N", "7"])
    assert "method=ties,domain=code" in out
    for phrase in ("L_inf", "stop at k=", "k80", "k90", "three-point forecast at k=9"):
        assert phrase in out


# --- plot -----------------------------------------------------------------------------------


def test_plot_with_a_fit_file_writes_a_png(sweep: Path, fit_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "fig.png"
    assert main(["plot", str(sweep), "--fit", str(fit_file), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_a_fit_file_fits_and_writes_an_svg(sweep: Path, tmp_path: Path) -> None:
    svg = tmp_path / "nofit.svg"
    assert main(["plot", str(sweep), "--by", "method", "--form", "per-size", "-o", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml")


# --- errors ---------------------------------------------------------------------------------


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    error = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(error) == 1 and error[0].startswith(f"hf-mergelaw {argv[0]}: error: ")
    assert message in error[0]
    assert out == ""


@pytest.fixture
def one_k_records(tmp_path: Path) -> Path:
    path = tmp_path / "one_k.jsonl"
    path.write_text("\n".join(json.dumps({"k": 3, "ce": 0.5 + i / 100}) for i in range(5)))
    return path


@pytest.mark.parametrize(
    ("records", "options", "message"),
    [
        ("missing", [], "does not exist"),
        ("one_k", ["--form", "per-size"], "only one k value"),
        ("sweep", ["--strict"], "strict mode"),
        ("sweep", ["--form", "c + a/k"], "--param a="),
    ],
    ids=["missing-records", "one-k-value", "strict", "undeclared-formula-param"],
)
def test_failed_fit_is_one_line_and_writes_no_output(
    records: str,
    options: list[str],
    message: str,
    sweep: Path,
    one_k_records: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = {"missing": tmp_path / "missing.jsonl", "one_k": one_k_records, "sweep": sweep}
    out = tmp_path / "fit.json"
    _fails(["fit", str(paths[records]), *options, "-o", str(out)], capsys, message)
    assert set(tmp_path.iterdir()) == {one_k_records}  # no output, no temp file


def test_failed_fit_keeps_the_previous_output_file(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fit.json"
    out.write_text("previous")
    argv = ["fit", str(sweep), "--form", "joint", "--by", "seed", "-o", str(out)]
    _fails(argv, capsys, "seed")
    assert out.read_text() == "previous"
    assert set(tmp_path.iterdir()) == {out}


def test_predict_beyond_a_per_size_fit_asks_for_a_joint_fit(
    per_size_fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(["predict", str(per_size_fit_file), "--N", "72"], capsys, "fit --form joint")


def test_plan_budget_on_a_per_size_fit_asks_for_a_joint_fit(
    per_size_fit_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(["plan", str(per_size_fit_file), "--budget", "10"], capsys, "--budget needs a joint fit")


def test_predict_refuses_a_json_file_that_is_not_a_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_fit = tmp_path / "x.json"
    not_fit.write_text("[]")
    _fails(["predict", str(not_fit)], capsys, "not a fit file")


def test_predict_reports_a_missing_fit_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(["predict", str(tmp_path / "none.json")], capsys, "does not exist")


def test_module_entry_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hf_mergelaw", "fit", str(tmp_path / "missing.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("hf-mergelaw fit: error: records file")
    assert "Traceback" not in result.stderr
