"""`hf-mergelaw pool geometry` end to end on a tiny Llama pool: every subset predicted with no
merge, calibrated on a few merges recorded like a sweep's, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_mergelaw.cli import main
from hf_mergelaw.files import read_jsonl
from hf_mergelaw.pool_model import PoolReport
from hf_mergelaw.testing import save_noisy_experts, tiny_llama_config, word_tokenizer
from tests.tiny_models import SENTENCES, save_family
from tests.tiny_models import sweep_yaml as write_sweep_yaml

M = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"), num_experts=M, noise=0.005)


def sweep_yaml(root: Path, family, **overrides: object) -> Path:
    """The tests' sweep YAML with average and DARE-linear over k = 1-4."""
    methods = [{"name": "average"}, {"name": "dare_linear", "density": 0.5}]
    return write_sweep_yaml(root, family, **{"methods": methods, "k": "1-4", **overrides})


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_zero_merges_predict_every_subset_of_every_method_and_domain(
    tmp_path, family, capsys
) -> None:
    config = sweep_yaml(tmp_path, family)
    out = tmp_path / "pool.json"
    payload = run_json(
        capsys,
        ["pool", "geometry", str(config), "--no-progress", "--calibrate", "0", "-o", str(out)],
    )
    groups = [(p["group"]["method"], p["group"]["domain"]) for p in payload["pools"]]
    assert groups == [(m, d) for m in ("average", "dare_linear") for d in ("a", "b", "macro")]
    assert payload["cost"]["calibration_merges"] == 0
    assert not (tmp_path / "out" / "results.jsonl").exists()  # nothing merged, nothing recorded
    report = PoolReport.load(out)
    macro = report.select({"method": "average", "domain": "macro"})[0]
    assert macro.source["kind"] == "geometry" and not macro.has_intervals
    predicted = run_json(capsys, ["pool", "predict", str(out), "--all"])["predictions"]
    assert len(predicted) == 6 * (2**M - 1)
    assert all(np.isfinite(row["mean"]) and row["lo"] is None for row in predicted)
    chosen = run_json(capsys, ["pool", "select", str(out), "--k", "2"])["selections"]
    assert {s["k"] for s in chosen} == {2} and all(s["p_best"] is None for s in chosen)
    caveats = run_json(capsys, ["pool", "select", str(out), "--k", "2"])["warnings"]
    assert len(caveats) == 6 and all("second-order prediction" in c for c in caveats)


def test_calibration_merges_are_recorded_like_a_sweeps_and_give_intervals(
    tmp_path, family, capsys
) -> None:
    config = sweep_yaml(tmp_path, family)
    out = tmp_path / "pool.json"
    payload = run_json(
        capsys,
        ["pool", "geometry", str(config), "--no-progress", "--calibrate", "6", "-o", str(out)],
    )
    records = [r for _, r in read_jsonl(tmp_path / "out" / "results.jsonl")]
    assert len(records) == 2 * 6
    assert [r["k"] for r in records if r["method"] == "average"] == [1, 1, 1, 1, 4, 2]
    model = PoolReport.load(out).select({"method": "average", "domain": "macro"})[0]
    assert model.has_intervals and model.source["calibration"]["merges"] == 6
    # Each merge is predicted inside the tiny pool's second-order regime: the calibrated
    # prediction of the measured merges lies within a hundredth of a nat.
    measured = {tuple(r["subset"]): r["ce"] for r in records if r["method"] == "average"}
    prediction = model.predict(list(measured))
    assert np.max(np.abs(prediction.mean - list(measured.values()))) < 0.01
    assert payload["cost"]["merge_eval_s"] > 0
    # A second run merges nothing new: the sweep's records file already holds them.
    run_json(capsys, ["pool", "geometry", str(config), "--no-progress", "--calibrate", "6"])
    assert len(list(read_jsonl(tmp_path / "out" / "results.jsonl"))) == 2 * 6


def test_the_geometry_alone_is_close_to_measured_merges_of_a_gentle_pool(
    tmp_path, family, capsys
) -> None:
    config = sweep_yaml(tmp_path, family, methods=[{"name": "average"}])
    run_json(
        capsys,
        [
            "pool",
            "geometry",
            str(config),
            "--no-progress",
            "--calibrate",
            "6",
            "-o",
            str(tmp_path / "p"),
        ],
    )
    records = [r for _, r in read_jsonl(tmp_path / "out" / "results.jsonl")]
    prior_rmse = PoolReport.load(tmp_path / "p").pools[-1].source["calibration"]["prior_rmse"]
    spread = np.std([r["ce"] for r in records if r["k"] == 1])
    assert prior_rmse < 0.2 * spread + 1e-3


def test_a_lora_expert_is_predicted_as_its_densified_update(tmp_path, family, capsys) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, experts = family
    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(
        tmp_path / "adapter"
    )
    pool = (base, {"lora": tmp_path / "adapter", **dict(list(experts.items())[:2])})
    yml = sweep_yaml(tmp_path / "run", pool, methods=[{"name": "average"}], k="1-3")
    out = tmp_path / "pool.json"
    # The calibration merges measure the adapter alone; the zero-merge model predicts it.
    run_json(capsys, ["pool", "geometry", str(yml), "--no-progress", "--calibrate", "5"])
    run_json(capsys, ["pool", "geometry", str(yml), "--no-progress", "--calibrate", "0",
                      "-o", str(out)])  # fmt: skip
    records = read_jsonl(tmp_path / "run" / "out" / "results.jsonl")
    measured = next(r["ce"] for _, r in records if r["subset"] == ["lora"])
    model = PoolReport.load(out).select({"domain": "macro"})[0]
    assert model.predict([("lora",)]).mean[0] == pytest.approx(measured, abs=1e-3)


def test_experts_of_another_shape_are_refused_before_any_curvature(tmp_path, capsys) -> None:
    base, _ = save_family(tmp_path / "a", num_experts=1)
    _, others = save_noisy_experts(
        tmp_path / "b", tiny_llama_config(hidden_size=16, num_attention_heads=2), 1,
        tokenizer=word_tokenizer(SENTENCES),
    )  # fmt: skip
    yml = sweep_yaml(tmp_path / "run", (base, {"wide": others["expert0"]}), k=1)
    capsys.readouterr()
    assert main(["pool", "geometry", str(yml), "--calibrate", "0"]) == 2
    assert "shape" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "argv", "message"),
    [
        ({"methods": [{"name": "model_stock"}]}, [], "cannot express"),
        ({}, ["--calibrate", "3"], "at least 6 subsets"),
        ({"eval": {"data": "empty.jsonl", "text_field": "text"}}, [], "is empty"),
    ],
)
def test_refusals_name_the_fix_and_write_nothing(
    tmp_path, family, capsys, overrides, argv, message
) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    config = sweep_yaml(tmp_path, family, **overrides)
    out = tmp_path / "pool.json"
    capsys.readouterr()
    assert main(["pool", "geometry", str(config), "--no-progress", *argv, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out" / "results.jsonl").exists()


def test_the_curvature_can_come_from_a_share_of_the_sequences(tmp_path, family, capsys) -> None:
    config = sweep_yaml(tmp_path, family, methods=[{"name": "average"}])
    argv = ["pool", "geometry", str(config), "--no-progress", "--calibrate", "0"]
    whole = run_json(capsys, argv)["pools"][-1]
    half = run_json(capsys, [*argv, "--curvature-sample", "0.5"])["pools"][-1]
    assert half["source"]["curvature_sample"] == 0.5
    # Every expert alone: the gradient is the whole set's either way, the curvature is not.
    assert half["beta"] != whole["beta"]
    assert half["law"]["L_inf"] == pytest.approx(whole["law"]["L_inf"], abs=1e-3)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--curvature-sample", "0"])
    assert "give a share in (0, 1]" in capsys.readouterr().err
