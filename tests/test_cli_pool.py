"""`hf-mergelaw pool fit / predict / select / plot` end to end, and their refusals.

Values are checked on the ``--json`` output; the tables are checked for their key quantities.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hf_mergelaw.cli import main
from hf_mergelaw.pool_model import synthetic_pool
from hf_mergelaw.subsets import sample_subsets

M = 7


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep's records: two methods, the macro CE and two domains' CEs; ties's merges weigh
    each member as a disjoint mean does (overlap 0.35), average's 1/k."""
    subsets = [
        s for k in range(1, M + 1) for s in sample_subsets(M, k, strategy="balanced", per_k=7)
    ]
    rows = []
    for method, seed, overlap in (("average", 0, 1.0), ("ties", 1, 0.35)):
        code, math_ = (
            replace(synthetic_pool(M, seed=s), overlap=overlap) for s in (seed, seed + 10)
        )
        for a, b in zip(code.records(subsets, method=method), math_.records(subsets), strict=True):
            per_domain = {"code": {"ce": a["ce"]}, "math": {"ce": b["ce"]}}
            rows.append({**a, "ce": (a["ce"] + b["ce"]) / 2, "per_domain": per_domain})
    path = tmp_path_factory.mktemp("pool_cli") / "sweep.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def pool_file(sweep: Path) -> Path:
    out = sweep.with_name("pool.json")
    assert main(["pool", "fit", str(sweep), "-o", str(out)]) == 0
    return out


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_table(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def run_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    return captured.err


def test_fit_writes_a_pool_per_method_and_curve(pool_file: Path) -> None:
    data = json.loads(pool_file.read_text())
    assert [p["group"] for p in data["pools"]] == [
        {"method": method, "domain": domain}
        for method in ("average", "ties")
        for domain in ("code", "macro", "math")
    ]
    pool = data["pools"][0]
    assert pool["experts"] == [f"e{i:02d}" for i in range(M)]
    assert pool["n_records"] == 43
    assert set(pool["beta"]) == set(pool["experts"])
    assert len(pool["gamma"]) == M and all(len(row) == M for row in pool["gamma"])
    assert [point["k"] for point in pool["pool_curve"]] == list(range(1, M + 1))
    assert pool["leave_one_out"]["r2_within_k"] > 0.9
    assert not list(pool_file.parent.glob(".*.tmp"))


def test_fit_prints_the_same_json_and_a_table(capsys, sweep: Path, pool_file: Path) -> None:
    assert run_json(capsys, ["pool", "fit", str(sweep)]) == json.loads(pool_file.read_text())
    table = run_table(capsys, ["pool", "fit", str(sweep)])
    assert "== method=average,domain=macro: 7 experts, 43 merges, f(k) free" in table
    assert "beta e00" in table and "(synergy)" in table and "E[L|k]" in table
    average, ties = table.split("== method=ties,domain=code")
    assert "member weight 1/k;" in average and "member weight 1/(1 + 0.3" in ties


def test_fit_with_a_law_curve_and_a_declared_pool(capsys, sweep: Path) -> None:
    experts = ",".join(f"e{i:02d}" for i in range(M))
    data = run_json(capsys, ["pool", "fit", str(sweep), "--curve", "law", "--experts", experts])
    curve = data["pools"][0]["curve"]
    assert curve["kind"] == "law" and set(curve["params"]) == {"L_inf", "A"}
    error = run_error(capsys, ["pool", "fit", str(sweep), "--experts", "e00,e01"])
    assert "outside the pool" in error


def test_fit_by_method_alone_says_to_group_by_domain(capsys, sweep: Path, tmp_path) -> None:
    out = tmp_path / "pool.json"
    error = run_error(capsys, ["pool", "fit", str(sweep), "--by", "method", "-o", str(out)])
    assert "differ in domain: add it to --by" in error
    assert not out.exists()


def test_predict_named_subsets(capsys, pool_file: Path) -> None:
    argv = ["pool", "predict", str(pool_file), "--subset", "e00,e03", "--subset", "e01,e02,e05"]
    data = run_json(capsys, [*argv, "--group", "method=average,domain=macro"])
    rows = data["predictions"]
    assert [r["subset"] for r in rows] == [["e00", "e03"], ["e01", "e02", "e05"]]
    assert all(r["lo"] < r["mean"] < r["hi"] and r["group"]["domain"] == "macro" for r in rows)
    assert [r["k"] for r in rows] == [2, 3]
    everywhere = run_json(capsys, argv)["predictions"]
    assert len(everywhere) == 2 * 6


def test_predict_all_lists_every_subset_and_what_was_measured(capsys, pool_file: Path) -> None:
    rows = run_json(capsys, ["pool", "predict", str(pool_file), "--all", "--group", "domain=code"])
    rows = rows["predictions"]
    assert len(rows) == 2 * (2**M - 1)
    measured = [r for r in rows if r["measured"] is not None]
    assert len(measured) == 2 * 43
    assert all(abs(r["measured"] - r["mean"]) < 0.05 for r in measured)
    table = run_table(
        capsys, ["pool", "predict", str(pool_file), "--all", "--group", "method=ties,domain=code"]
    )
    assert "e00,e01,e02,e03,e04,e05,e06" in table


def test_predict_refuses_experts_outside_the_pool(capsys, pool_file: Path) -> None:
    error = run_error(capsys, ["pool", "predict", str(pool_file), "--subset", "e00,nobody"])
    assert "nobody not in the pool" in error


def test_select_every_size_and_overall(capsys, pool_file: Path) -> None:
    argv = ["pool", "select", str(pool_file), "--group", "method=average,domain=macro"]
    data = run_json(capsys, [*argv, "--top", "2", "--draws", "200"])
    sizes = [s for s in data["selections"] if s["scope"] == "size"]
    overall = [s for s in data["selections"] if s["scope"] == "overall"]
    assert len(sizes) == 2 * M - 1  # one subset of every expert
    assert [s["rank"] for s in overall] == [1, 2]
    assert all(0 <= s["p_best"] <= 1 and s["lo"] <= s["mean"] <= s["hi"] for s in sizes)
    assert any(s["merged"] for s in sizes) and not all(s["merged"] for s in sizes)
    (greedy,) = data["greedy"]
    assert sorted(greedy["order"]) == [f"e{i:02d}" for i in range(M)]
    table = run_table(capsys, [*argv, "--draws", "100"])
    assert "overall" in table and "greedy order" in table


def test_select_one_size(capsys, pool_file: Path) -> None:
    argv = ["pool", "select", str(pool_file), "--k", "3", "--top", "5", "--draws", "100"]
    data = run_json(capsys, [*argv, "--group", "method=ties,domain=math"])
    assert [(s["k"], s["rank"]) for s in data["selections"]] == [(3, r) for r in range(1, 6)]


def test_select_refuses_a_size_larger_than_the_pool(capsys, pool_file: Path) -> None:
    error = run_error(capsys, ["pool", "select", str(pool_file), "--k", "9"])
    assert "has 7 experts" in error


def test_plot_writes_three_figures_per_pool(capsys, pool_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    run_table(capsys, ["pool", "plot", str(pool_file), "-o", str(out), "--group", "domain=macro"])
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(
        f"{method}-macro-{kind}.png"
        for method in ("average", "ties")
        for kind in ("synergy", "effects", "predicted")
    )
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in out.iterdir())


def test_a_file_that_is_not_a_pool_file(capsys, sweep: Path, tmp_path: Path) -> None:
    other = tmp_path / "fit.json"
    other.write_text('{"fits": []}')
    assert "not a pool-model file" in run_error(capsys, ["pool", "select", str(other)])
    assert "does not exist" in run_error(capsys, ["pool", "plot", "nope.json", "-o", "x"])


def test_a_group_that_matches_nothing(capsys, pool_file: Path) -> None:
    error = run_error(capsys, ["pool", "select", str(pool_file), "--group", "method=dare"])
    assert "no pool matches" in error
