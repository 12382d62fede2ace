"""Every example runs as a user would run it (from a copy of examples/, on the tiny pool), so the
examples cannot rot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(REPO / "examples", root / "examples")
    _run(root, "examples/tiny_pool.py")
    return root


def _run(cwd: Path, *command: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd / "examples")]),
        "TRITON_INTERPRET": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cwd / "hf_home"),
    }
    executable = [sys.executable, *command] if command[0].endswith(".py") else list(command)
    result = subprocess.run(
        executable, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stderr[-4000:]}"
    return result.stdout


def test_merge_kernels(workdir: Path) -> None:
    assert "ties       relative change" in _run(workdir, "examples/merge_kernels.py")


def test_evaluate_metric(workdir: Path) -> None:
    _run(workdir, sys.executable, "-m", "hf_mergelaw", "register-metric")
    out = _run(workdir, "examples/evaluate_metric.py")
    assert "'cross_entropy/animals'" in out and "response-only cross-entropy" in out


def test_sweep_then_fit_and_plan(workdir: Path) -> None:
    _run(workdir, sys.executable, "-m", "hf_mergelaw", "sweep", "examples/sweep.yml", "--fit",
         "--plot", "--no-progress")  # fmt: skip
    assert (workdir / "tiny_pool" / "sweep" / "results.law.png").stat().st_size > 10_000
    out = _run(workdir, "examples/fit_and_plan.py", "tiny_pool/sweep/results.jsonl")
    assert out.count("L_inf=") == 3 and "stop at k=" in out


def test_trainer_callback(workdir: Path) -> None:
    assert "eval_merge_pool_size" in _run(workdir, "examples/trainer_callback.py")


def test_lora_experts(workdir: Path) -> None:
    assert "the adapter changes 4 tensors" in _run(workdir, "examples/lora_experts.py")


def test_mergekit_yaml_with_ties_fused(workdir: Path) -> None:
    _run(workdir, "mergekit-yaml", "examples/mergekit_ties_fused.yml", str(workdir / "merged"))
    assert (workdir / "merged" / "model.safetensors").exists()
