"""`hf-mergelaw fit / predict / plan / plot` end to end, and their error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mergelaw.cli import main
from tests.law_data import paper_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = paper_sweep("average", "code", sizes=(0.5, 1.5, 3.0, 7.0, 14.0), seed=0)
    rows += paper_sweep("ties", "code", sizes=(0.5, 1.5, 3.0, 7.0, 14.0), seed=1)
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


def _json_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


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


def test_fit_table_and_dropped_warning(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", str(sweep), "--form", "per-size", "--by", "method"]) == 0
    out, err = capsys.readouterr()
    assert "== method=ties,N=14: per-size" in out
    assert "L_inf" in out and "90% CI" in out
    assert "warning: dropped 1 of" in err and "1 k < 1" in err


def test_predict(fit_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _json_out(capsys, ["predict", str(fit_file), "--N", "72", "--k", "1-9", "--json"])
    rows = data["predictions"]
    assert len(rows) == 18
    row = rows[0]
    assert set(row) >= {"group", "N", "k", "mean", "lo", "hi", "pi_lo", "pi_hi"}
    assert row["pi_lo"] < row["lo"] < row["mean"] < row["hi"] < row["pi_hi"]
    assert (row["N"], row["k"], row["level"]) == (72.0, 1.0, 0.9)
    one = _json_out(
        capsys,
        ["predict", str(fit_file), "--N", "7", "--k", "2,4", "--group", "method=ties", "--json"],
    )
    assert [(r["group"]["method"], r["k"]) for r in one["predictions"]] == [
        ("ties", 2),
        ("ties", 4),
    ]
    assert main(["predict", str(fit_file), "--N", "72", "--k", "9"]) == 0
    assert "method=average,domain=code" in capsys.readouterr().out


def test_plan(fit_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"base": {"0.5": 1, "72": 100}, "per_expert": 2, "unit": "GPU-h"}))
    argv = ["plan", str(fit_file), "--target-loss", "0.34", "--min-gain", "0.002", "--eps", "0.005"]
    data = _json_out(
        capsys, [*argv, "--N", "72", "--budget", "150", "--cost-model", str(cost), "--json"]
    )
    plan = data["plans"][0]
    for key in ("group", "k_for_target", "k_stop", "k_eps", "k80", "k90", "k_for_target_ci"):
        assert key in plan
    assert plan["N"] == 72.0 and plan["k90"] in (5, 6, 7)
    trade = data["tradeoffs"][0]
    assert trade["unit"] == "GPU-h" and trade["best_within_budget"]["cost"] <= 150
    below = _json_out(
        capsys, ["plan", str(fit_file), "--target-loss", "0.01", "--N", "72", "--json"]
    )
    assert below["plans"][0]["k_for_target"] is None
    assert main([*argv, "--N", "7"]) == 0
    out = capsys.readouterr().out
    assert "three-point forecast at k=9" in out and "stop at k" in out


def test_plot(sweep: Path, fit_file: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "fig.png"
    assert main(["plot", str(sweep), "--fit", str(fit_file), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_fit = tmp_path / "nofit.svg"
    assert (
        main(["plot", str(sweep), "--by", "method", "--form", "per-size", "-o", str(no_fit)]) == 0
    )
    assert no_fit.read_text().lstrip().startswith("<?xml")


def test_formula_form(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", str(sweep), "--by", "method", "--form", "L = c + B * N**-e + a / (k + b)"]
    params = ["--param", "c=0:2", "--param", "B=0:", "--param", "e=0:3", "--param", "a=0:"]
    data = _json_out(capsys, [*argv, *params, "--param", "b=0:5:0.5", "--json"])
    assert set(data["fits"][0]["params"]) == {"c", "B", "e", "a", "b"}
    assert data["fits"][0]["r2"] > 0.99


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert message in err
    assert "Traceback" not in err and out == ""


def test_errors_are_one_line_and_leave_no_output(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fit.json"
    _fails(["fit", str(tmp_path / "missing.jsonl"), "-o", str(out)], capsys, "does not exist")
    one_k = tmp_path / "one_k.jsonl"
    one_k.write_text("\n".join(json.dumps({"k": 3, "ce": 0.5 + i / 100}) for i in range(5)))
    _fails(["fit", str(one_k), "--form", "per-size", "-o", str(out)], capsys, "only one k value")
    _fails(["fit", str(sweep), "--strict", "-o", str(out)], capsys, "strict mode")
    _fails(["fit", str(sweep), "--form", "c + a/k", "-o", str(out)], capsys, "--param a=")
    assert not out.exists()
    out.write_text("previous")
    _fails(["fit", str(sweep), "--form", "joint", "--by", "seed", "-o", str(out)], capsys, "seed")
    assert out.read_text() == "previous"
    assert list(tmp_path.iterdir()) == sorted([one_k, out]) or set(tmp_path.iterdir()) == {
        one_k,
        out,
    }


def test_errors_on_fit_files(sweep: Path, tmp_path: Path, capsys) -> None:
    per_size = tmp_path / "per_size.json"
    assert main(["fit", str(sweep), "--form", "per-size", "-o", str(per_size)]) == 0
    _fails(["predict", str(per_size), "--N", "72"], capsys, "fit --form joint")
    _fails(["plan", str(per_size), "--budget", "10"], capsys, "--budget needs a joint fit")
    not_fit = tmp_path / "x.json"
    not_fit.write_text("[]")
    _fails(["predict", str(not_fit)], capsys, "not a fit file")
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
