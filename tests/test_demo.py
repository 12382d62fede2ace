"""The demo at its CI size (`quick=True`), end to end, and its outputs.

One module-scoped run builds the pool into a temporary cache; a second run into the same output
must reuse the cache (the build is patched to fail) and resume (nothing merged twice).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from hf_mergelaw.cli.demo import add_demo_arguments, demo_command
from hf_mergelaw.demo import pool as demo_pool
from hf_mergelaw.demo.corpus import split_files
from hf_mergelaw.demo.run import DemoResult, demo_methods, run_demo
from hf_mergelaw.demo.science import KSummary, MethodCheck, finite_pool_sd
from hf_mergelaw.demo.settings import QUICK
from hf_mergelaw.errors import DemoError
from hf_mergelaw.law import FitReport
from hf_mergelaw.pool_model import PoolReport
from hf_mergelaw.record_schema import job_key
from hf_mergelaw.sweep import plan_jobs
from hf_mergelaw.sweep_config import SamplingConfig

M = len(QUICK.pool.domains)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, DemoResult]:
    root = tmp_path_factory.mktemp("demo")
    output, cache = root / "out", root / "cache"
    first = run_demo(output, quick=True, cache_dir=cache, progress=False, threads=1)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second run trained a pool instead of loading the cache")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_pool, "build_pool", no_build)
        second = run_demo(output, quick=True, cache_dir=cache, progress=False, threads=1)
    return first, second


def planned_jobs() -> int:
    sampling = SamplingConfig("uniform", QUICK.sweep.per_k, QUICK.sweep.seed)
    names = [f"e{i}" for i in range(M)]
    return len(plan_jobs(demo_methods(QUICK), range(1, M + 1), names, sampling))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_have_the_sweep_schema(runs):
    first, _ = runs
    records = read_records(first.records)
    assert len(records) == planned_jobs() == first.records_written
    assert {r["method"] for r in records} == {"average", "ties_fused"}
    assert {r["k"] for r in records} == set(range(1, M + 1))
    for r in records:
        assert r["domain"] == "macro" and len(r["subset"]) == r["k"]
        assert set(r["per_domain"]) == set(QUICK.pool.domains)
        assert all(v["ce"] > 0 and v["num_tokens"] > 0 for v in r["per_domain"].values())
        mean = sum(v["ce"] for v in r["per_domain"].values()) / M
        assert r["ce"] == pytest.approx(mean)
        assert 0 < r["N"] < 1e-3  # billions: a base of well under a million parameters


def test_fit_json_holds_finite_per_size_fits(runs):
    first, _ = runs
    report = FitReport.load(first.fit)
    groups = {(f.group["method"], f.group["domain"]) for f in report.fits}
    domains = {*QUICK.pool.domains, "macro"}
    assert groups == {(m, d) for m in ("average", "ties_fused") for d in domains}
    for fit in report.fits:
        assert fit.form == "per-size"
        assert set(fit.params) == {"L_inf", "A", "b"}
        assert all(math.isfinite(v) for v in fit.params.values())
        assert math.isfinite(fit.r2) and fit.n_cells == M


def test_figures_are_real_pngs(runs):
    first, _ = runs
    pool_figures = {
        f"pool/{method}-macro-{figure}"
        for method in ("average", "ties_fused")
        for figure in ("synergy", "effects", "predicted")
    }
    assert set(first.figures) == {
        "cross_domain",
        "in_domain/average",
        "in_domain/ties_fused",
        "spread",
        "pool_held_out",
        "geometry_predicted",
        *pool_figures,
    }
    for path in first.figures.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 20_000
        with Image.open(path) as image:
            assert min(image.size) > 400


def test_report_states_the_fit_the_plan_and_the_science_check(runs):
    first, _ = runs
    text = first.report.read_text()
    for phrase in ("R²", "## Plan", "Stop rule", "k90", "## Science check", "spread"):
        assert phrase in text
    for method in ("average", "ties_fused"):
        r2 = FitReport.load(first.fit).select({"method": method, "domain": "macro"})[0].r2
        assert f"{r2:.4f}" in text
    for name in ("law_cross_domain.png", "spread.png", "law_in_domain_average.png"):
        assert name in text
    plans = json.loads(first.plan.read_text())
    assert set(plans) == {"average", "ties_fused"}
    assert all(p["k90"] >= 1 and p["k_stop"] >= 1 for p in plans.values())
    science = json.loads(first.science.read_text())
    assert [m["method"] for m in science["methods"]] == ["average", "ties_fused"]
    assert not list(first.output_dir.glob(".*.tmp"))  # atomic writes left no temp files


def test_every_merge_is_predicted_from_curvature_before_merging(runs):
    first, _ = runs
    report = PoolReport.load(first.geometry)
    macro = {m.group["method"]: m for m in report.select({"domain": "macro"})}
    assert set(macro) == {"average", "ties_fused"}
    assert all(m.source["kind"] == "geometry" and not m.has_intervals for m in macro.values())
    scores = first.geometry_check.to_dict()["methods"]
    # The quick pool's experts barely move the base: the expansion orders the merges well.
    assert scores["average"]["shape_r2"] > 0.9 and scores["average"]["spearman"] > 0.9
    assert scores["average"]["calibration_merges"] == 2 * M
    assert "## Before merging: the pool model from curvature" in first.report.read_text()


def test_pool_model_is_checked_on_merges_it_was_not_fitted_on(runs):
    first, _ = runs
    fitted = {(r["method"], frozenset(r["subset"])) for r in read_records(first.records)}
    held = read_records(first.held_out)
    # The quick sweep leaves k = 2, 3, 4 partly unmerged (6 of 15, 20, 15): 3 held out of each.
    assert len(held) == first.held_out_written == 2 * 3 * 3
    assert not {(r["method"], frozenset(r["subset"])) for r in held} & fitted
    check = json.loads(first.pool_check.read_text())["methods"]
    assert [m["method"] for m in check] == ["average", "ties_fused"]
    text = first.report.read_text()
    assert "## Which experts to merge: the pool model" in text and "pool_held_out.png" in text
    for method in check:
        assert method["held_out"] == 9 and method["held_out_ks"] == [2, 3, 4]
        assert method["fitted_on"] == len(fitted) // 2
        assert math.isfinite(method["r2_within_k"]) and 0 <= method["coverage"] <= 1
        assert f"{method['r2_within_k']:.3f}" in text
        assert [s["k"] for s in method["best"]] == list(range(1, M))
        assert all(0 <= s["p_best"] <= 1 and s["scope"] == "size" for s in method["best"])
        overall = method["overall"]
        assert overall["scope"] == "overall" and method["merge_everything_ce"] > 0
        assert f"{method['merge_everything_ce']:.4f}" in text
    pools = PoolReport.load(first.pool_model).pools
    domains = {*QUICK.pool.domains, "macro"}
    assert {(p.group["method"], p.group["domain"]) for p in pools} == {
        (m, d) for m in ("average", "ties_fused") for d in domains
    }


def test_every_bound_pinned_parameter_and_the_answers_on_it_carry_a_warning(runs):
    first, _ = runs
    report = FitReport.load(first.fit)
    text = first.report.read_text()
    assert any(fit.pinned for fit in report.fits)  # the quick pool pins b on several curves
    for fit in report.fits:
        for name, side in fit.pinned.items():
            assert any(w.startswith(f"{name} = ") and side in w for w in fit.warnings)
            assert fit.warnings[0] in text
    plans = json.loads(first.plan.read_text())
    for fit in report.select({"domain": "macro"}):
        if "b" in fit.pinned:
            warnings = plans[fit.group["method"]]["warnings"]
            assert any(w.startswith("k90 rests on b") for w in warnings)


def test_second_run_loads_the_cache_and_resumes(runs):
    first, second = runs
    assert first.pool.built and not second.pool.built
    assert second.pool.root == first.pool.root
    assert second.records_written == 0 and second.records_skipped == planned_jobs()
    assert second.held_out_written == 0
    records = read_records(second.records)
    keys = [job_key(r["method"], r["params"], r["subset"]) for r in records]
    assert len(keys) == len(set(keys)) == planned_jobs()
    assert second.timings["total"] < first.timings["total"]


def test_output_of_another_size_is_refused(runs, tmp_path):
    first, _ = runs
    with pytest.raises(DemoError, match="other settings"):
        run_demo(first.output_dir, quick=False, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # refused before any training


def test_cli_options_reach_the_demo(runs, capsys):
    import argparse

    first, _ = runs
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    options = ["--quick", "--threads", "1", "--min-gain", "0.01", "--target-loss", "9.0"]
    folders = ["-o", str(first.output_dir), "--cache-dir", str(first.pool.root.parent)]
    args = parser.parse_args(folders + options)
    assert demo_command(args) == 0
    out = capsys.readouterr().out
    assert "Plan (cross-domain)" in out and "stop at k=" in out
    plans = json.loads((first.output_dir / "plan.json").read_text())
    assert all(p["target_loss"] == 9.0 and p["min_gain"] == 0.01 for p in plans.values())


def test_held_out_split_is_by_file_hash_and_size():
    sizes = {f"pkg/m{i}.py": 1000 * (i + 1) for i in range(10)}
    train, held = split_files(sizes, 0.2)
    assert split_files(dict(reversed(sizes.items())), 0.2) == (train, held)
    assert sorted(train + held) == sorted(sizes) and train and held
    held_chars = sum(sizes[f] for f in held)
    assert held_chars >= 0.2 * sum(sizes.values())
    assert held_chars - sizes[held[-1]] < 0.2 * sum(sizes.values())  # stops once it is enough


def test_finite_pool_spread_reference():
    assert finite_pool_sd(1, 8) == pytest.approx(1.0)
    assert finite_pool_sd(8, 8) == pytest.approx(0.0)
    assert finite_pool_sd(2, 1000) == pytest.approx(1 / math.sqrt(2), rel=1e-3)


def summary(k: int, mean: float, sd: float, n: int = 8) -> KSummary:
    return KSummary(k, n, math.comb(8, k), mean, sd, 2 * sd)


def test_diagnosis_names_sampling_noise_and_a_bound_b():
    means = [3.89, 3.888, 3.88, 3.872, 3.866, 3.862, 3.859, 3.857]
    by_k = [
        summary(k, m, 0.016 / math.sqrt(k), n=min(8, math.comb(8, k)))
        for k, m in zip(range(1, 9), means, strict=True)
    ]
    check = MethodCheck("ties_fused", 0.91, {"a": 0.9}, by_k, b=5.0, b_upper=5.0)
    assert check.falls and check.spread_shrinks and not check.passed
    assert check.by_k[0].mean_se == 0.0  # all 8 singletons merged: exact
    text = " ".join(check.diagnosis())
    assert "--subsets all" in text and "upper bound (5)" in text and "k=1->2 gains" in text
    assert "TIES" in text


@pytest.mark.parametrize(("given", "expected"), [("all", "all"), ("12", 12)])
def test_subsets_option(given, expected):
    import argparse

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    assert parser.parse_args(["--subsets", given]).subsets == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["--subsets", "1"])
