"""The fused mergekit methods, end to end.

Slow tests install the package from a freshly built wheel into a venv (made with
`--system-site-packages`, so torch and mergekit come from this environment) and run the real
`mergekit-yaml` console script with that venv's interpreter: the `.pth` import hook is the only
thing that can make `ties_fused` visible there. References run stock mergekit in this process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FUSED = (
    "ties_fused",
    "dare_ties_fused",
    "dare_linear_fused",
    "task_arithmetic_fused",
    "breadcrumbs_fused",
    "breadcrumbs_ties_fused",
)
# Exactly representable in bf16, so mergekit's rounding of weights to the compute dtype is moot.
WEIGHTS = (0.5, 0.75, 1.0)
DENSITIES = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class WheelEnv:
    python: Path
    site_packages: Path


@dataclass(frozen=True)
class TinyModels:
    base: Path
    experts: tuple[Path, ...]


def _run(cmd: Sequence[str | Path], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # Keep PYTHONPATH (it may be where mergekit lives) but never the checkout itself.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    python_path = [p for p in paths if p and Path(p).resolve() != REPO]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        pytest.fail(f"{cmd} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> WheelEnv:
    """hf-mergelaw installed from a wheel built from this checkout (once per session)."""
    root = tmp_path_factory.mktemp("wheel_env")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", root / "dist", REPO], root)
    (wheel,) = (root / "dist").glob("hf_mergelaw-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", root / "venv"], root)
    python = root / "venv" / "bin" / "python"
    # --ignore-installed: CI has installed the project system-wide, which the venv also sees.
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel], root)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root)
    return WheelEnv(python=python, site_packages=Path(site.stdout.strip()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """A tiny random Llama base and three fine-tune-like experts (base + small noise)."""
    from hf_mergelaw.testing import gaussian_noise, save_noisy_experts, tiny_llama_config

    base, experts = save_noisy_experts(
        tmp_path_factory.mktemp("tiny_llamas"),
        tiny_llama_config(num_attention_heads=16),
        len(WEIGHTS),
        perturb=gaussian_noise(0.01),
    )
    return TinyModels(base=base, experts=tuple(experts.values()))


def _config(models: TinyModels, method: str, **options: object) -> dict:
    densities = options.pop("densities", DENSITIES)
    return {
        "merge_method": method,
        "base_model": str(models.base),
        "models": [
            {"model": str(path), "parameters": {"weight": w, "density": d}}
            for path, w, d in zip(models.experts, WEIGHTS, densities, strict=True)
        ],
        "dtype": options.pop("dtype", "float32"),
        **({"parameters": options} if options else {}),
    }


def _mergekit_yaml(python: Path, config: dict, out: Path) -> dict[str, torch.Tensor]:
    """Run the installed `mergekit-yaml` console script with `python`; return the merged tensors.

    The working directory is `out`, so nothing is imported from this checkout.
    """
    script = Path(sysconfig.get_path("scripts")) / "mergekit-yaml"
    return _merge_cli([python, script], config, out, cwd=out)


def _merge_cli(
    command: Sequence[str | Path], config: dict, out: Path, *, cwd: Path, extra: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    out.mkdir(parents=True)
    config_path = out / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    flags = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet", *extra]
    _run([*command, config_path, out / "merged", *flags], cwd=cwd)
    return _load_merged(out / "merged")


def _load_merged(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _stock_merge(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit's own `run_merge` (the pipeline behind mergekit-yaml) in this process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return _load_merged(out)


def _state_dicts(models: TinyModels) -> dict[str, dict[str, torch.Tensor]]:
    paths = {"base": models.base} | {f"e{i}": p for i, p in enumerate(models.experts)}
    return {key: load_file(path / "model.safetensors") for key, path in paths.items()}


def _assert_same_tensors(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tolerance: float
) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    _, exponent = torch.frexp(x.double().abs().clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 8)


def _ties_oracle(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    lambda_: float,
) -> torch.Tensor:
    """float64 TIES (normalize on) on the decisions numerics.md fixes: trim and elect on deltas
    rounded to the inputs' dtype, threshold ties kept lowest index first."""
    base64, kept = base.double().reshape(-1), []
    for expert, weight, density in zip(experts, weights, densities, strict=True):
        delta = (expert - base).reshape(-1)
        count = max(1, int(density * delta.numel()))
        order = torch.sort(delta.abs().float(), descending=True, stable=True).indices
        mask = torch.zeros_like(delta, dtype=torch.bool)
        mask[order[:count]] = True
        kept.append((torch.where(mask, delta.double(), 0.0) * weight, weight))
    elected = sum(t for t, _ in kept) >= 0
    agree = [(t > 0) == elected for t, _ in kept]
    mixed = sum(torch.where(a & (t != 0), t, 0.0) for a, (t, _) in zip(agree, kept, strict=True))
    divisor = sum(torch.where(a & (t != 0), w, 0.0) for a, (t, w) in zip(agree, kept, strict=True))
    mixed = mixed / torch.where(divisor == 0, 1.0, divisor) * lambda_
    return (base64 + mixed).reshape(base.shape)


# --- the wheel, the .pth hook and start-up cost ----------------------------------------------


@pytest.mark.slow
def test_interpreter_start_imports_neither_torch_nor_mergekit(wheel_env: WheelEnv) -> None:
    probe = (
        "import sys; print(*(m in sys.modules for m in ('torch', 'mergekit', '_hf_mergelaw_hook')))"
    )
    result = _run([wheel_env.python, "-c", probe], cwd=wheel_env.python.parent)
    assert result.stdout.split() == ["False", "False", "True"]


@pytest.mark.slow
def test_hook_registers_from_the_installed_wheel(wheel_env: WheelEnv) -> None:
    probe = (  # list the methods before importing mergekit_plugins explicitly
        "import mergekit.merge_methods as mm;"
        "print(sorted(m.spec.name for m in mm.registered_methods() if 'fused' in m.spec.name));"
        "import mergekit_plugins, _hf_mergelaw_hook;"
        "print(mergekit_plugins.__file__); print(_hf_mergelaw_hook.__file__)"
    )
    lines = _run([wheel_env.python, "-c", probe], cwd=wheel_env.python.parent).stdout.splitlines()
    assert lines[0] == str(sorted(FUSED))
    for path in lines[1:]:
        assert Path(path).is_relative_to(wheel_env.site_packages)


@pytest.mark.slow
def test_editable_install_gets_the_hook(tmp_path: Path) -> None:
    """hatchling ships force-included files in editable wheels too."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", tmp_path / "venv"], tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    install = [python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q"]
    _run([*install, "-e", REPO], tmp_path)
    # get() before any explicit import: only the hook can have registered the method.
    probe = "import mergekit.merge_methods as mm; mm.get('ties_fused'); import mergekit_plugins;"
    probe += "print(mergekit_plugins.__file__)"
    result = _run([python, "-c", probe], cwd=tmp_path)
    assert Path(result.stdout.strip()).is_relative_to(REPO)


# --- mergekit-yaml parity ---------------------------------------------------------------------


@pytest.mark.slow
def test_ties_fused_matches_ties_in_fp32(wheel_env, tiny_models, tmp_path) -> None:
    fused = _mergekit_yaml(wheel_env.python, _config(tiny_models, "ties_fused"), tmp_path / "f")
    stock = _stock_merge(_config(tiny_models, "ties"), tmp_path / "stock")
    _assert_same_tensors(fused, stock, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_ties_fused_bf16_within_numerics_bound(wheel_env, tiny_models, tmp_path) -> None:
    """Error against float64 at most mergekit's plus one bf16 ulp (numerics.md)."""
    options = {"dtype": "bfloat16", "lambda": 0.9, "int8_mask": True}
    fused = _mergekit_yaml(
        wheel_env.python, _config(tiny_models, "ties_fused", **options), tmp_path / "f"
    )
    stock = _stock_merge(_config(tiny_models, "ties", **options), tmp_path / "stock")
    inputs = _state_dicts(tiny_models)
    for name, merged in fused.items():
        assert merged.dtype == stock[name].dtype == torch.bfloat16
        base, *experts = (inputs[key][name].to(torch.bfloat16) for key in inputs)
        oracle = _ties_oracle(base, experts, WEIGHTS, DENSITIES, lambda_=0.9)
        fused_error = (merged.double() - oracle).abs()
        stock_error = (stock[name].double() - oracle).abs()
        excess = fused_error - stock_error - _bf16_ulp(oracle)
        assert excess.max() <= 0, f"{name}: fused error exceeds the bound by {excess.max()}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_fused_at_density_one_matches_dare(wheel_env, tiny_models, tmp_path, method) -> None:
    ones = (1.0,) * len(WEIGHTS)
    fused = _mergekit_yaml(
        wheel_env.python, _config(tiny_models, f"{method}_fused", densities=ones), tmp_path / "f"
    )
    stock = _stock_merge(_config(tiny_models, method, densities=ones), tmp_path / "stock")
    _assert_same_tensors(fused, stock, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_dare_is_reproducible_across_runs_and_entry_points(wheel_env, tiny_models, tmp_path):
    """Installed plugin, `python -m mergekit_plugins` in the checkout, Python API: same bits."""
    config = _config(tiny_models, "dare_ties_fused", seed=7)
    installed = _mergekit_yaml(wheel_env.python, config, tmp_path / "installed")
    fallback = [sys.executable, "-m", "mergekit_plugins"]
    checkout = _merge_cli(fallback, config, tmp_path / "checkout", cwd=REPO)
    _assert_same_tensors(checkout, installed, rtol=0, atol=0)
    _assert_same_tensors(
        _api_merge(tiny_models, "dare_ties_fused", seed=7), installed, rtol=0, atol=0
    )
    assert not torch.equal(
        installed["lm_head.weight"],
        _api_merge(tiny_models, "dare_ties_fused", seed=8)["lm_head.weight"],
    )


@pytest.mark.slow
def test_mergekit_yaml_rejects_what_mergekit_rejects(wheel_env, tiny_models, tmp_path) -> None:
    config = _config(tiny_models, "ties_fused")
    del config["base_model"]
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    script = Path(sysconfig.get_path("scripts")) / "mergekit-yaml"
    result = _run(
        [wheel_env.python, script, tmp_path / "config.yml", tmp_path / "out"], tmp_path, check=False
    )
    assert result.returncode != 0
    assert "Merge method requires a base input" in result.stderr


@pytest.mark.slow
@pytest.mark.gpu
def test_cuda_runs_match_cpu(tiny_models, tmp_path) -> None:
    """`--cuda` (Triton): TIES as stock CPU `ties` up to fp32 summation order, DARE keeps the
    entries the CPU keeps. Uses `python -m mergekit_plugins`: GPU machines cannot build wheels."""
    command, cuda = [sys.executable, "-m", "mergekit_plugins"], ["--cuda"]
    ties = _merge_cli(
        command, _config(tiny_models, "ties_fused"), tmp_path / "t", cwd=REPO, extra=cuda
    )
    stock = _stock_merge(_config(tiny_models, "ties"), tmp_path / "stock")
    _assert_same_tensors(ties, stock, rtol=1e-6, atol=1e-7)
    config = _config(tiny_models, "dare_ties_fused", seed=7)
    dare = _merge_cli(command, config, tmp_path / "d", cwd=REPO, extra=cuda)
    cpu = _api_merge(tiny_models, "dare_ties_fused", seed=7)
    _assert_same_tensors(dare, cpu, rtol=1e-6, atol=1e-7)


# --- Python API (in this process) -------------------------------------------------------------


def _api_merge(models: TinyModels, method: str, **parameters: object) -> dict[str, torch.Tensor]:
    from mergekit.merge_methods.api import merge_state_dicts

    import mergekit_plugins  # noqa: F401  (registers the fused methods)

    keys = [f"e{i}" for i in range(len(WEIGHTS))]
    parameters = {
        "weight": dict(zip(keys, WEIGHTS, strict=True)),
        "density": dict(zip(keys, DENSITIES, strict=True)),
    } | parameters
    return merge_state_dicts(_state_dicts(models), method, base="base", parameters=parameters)


def test_fused_methods_copy_stock_parameters() -> None:
    from mergekit import merge_methods

    import mergekit_plugins

    mergekit_plugins.register()  # already registered on import: must be a no-op
    for name in FUSED:
        fused, stock = merge_methods.get(name), merge_methods.get(name.removesuffix("_fused"))
        describe = [(p.name, p.scope, p.default) for p in fused.spec.parameters]
        expected = [(p.name, p.scope, p.default) for p in stock.spec.parameters]
        if name.startswith("dare"):
            expected.append(("seed", "shared", 0))
        assert describe == expected
        assert fused.spec.contract == stock.spec.contract
    names = [m.spec.name for m in merge_methods.registered_methods()]
    assert len(names) == len(set(names))


def test_dare_stream_is_pinned() -> None:
    """The stream is part of every fused DARE output; a change here changes users' merges."""
    from mergekit_plugins import tensor_stream

    assert tensor_stream("lm_head.weight") == 4091802604510340515


def test_python_api_ties_fused_matches_ties(tiny_models: TinyModels) -> None:
    options = {"lambda": 0.8, "normalize": False}
    fused = _api_merge(tiny_models, "ties_fused", **options)
    _assert_same_tensors(fused, _api_merge(tiny_models, "ties", **options), rtol=1e-6, atol=1e-7)


def test_dare_masks_depend_only_on_seed_and_tensor_name(tiny_models: TinyModels) -> None:
    from mergekit.merge_methods.api import merge_state_dicts, merge_tensors

    full = _api_merge(tiny_models, "dare_linear_fused", seed=3)
    reversed_states = {
        key: dict(reversed(state.items())) for key, state in _state_dicts(tiny_models).items()
    }
    parameters = {"weight": list(WEIGHTS), "density": list(DENSITIES), "seed": 3}
    shuffled = merge_state_dicts(
        reversed_states, "dare_linear_fused", base="base", parameters=parameters
    )
    _assert_same_tensors(shuffled, full, rtol=0, atol=0)
    name = "model.layers.1.mlp.up_proj.weight"
    alone = merge_tensors(
        [state[name] for state in _state_dicts(tiny_models).values()],
        "dare_linear_fused",
        parameters=parameters,
        base_index=0,
        name=name,
    )
    assert torch.equal(alone, full[name])


def test_dare_keeps_density_fraction_and_rescale_off_keeps_values() -> None:
    from mergekit.merge_methods.api import merge_tensors

    base = torch.zeros(200_003)
    expert = torch.randn(200_003)
    density = 0.3
    merged = merge_tensors(
        [base, expert],
        "dare_linear_fused",
        parameters={"weight": [1.0], "density": [density], "rescale": False, "seed": 1},
        base_index=0,
        name="w",
    )
    kept = merged != 0
    assert torch.equal(merged[kept], expert[kept])
    sigma = math.sqrt(density * (1 - density) / base.numel())
    assert abs(kept.float().mean().item() - density) < 5 * sigma


# --- errors -----------------------------------------------------------------------------------


def _error_of(method: str, tensors: Sequence[torch.Tensor], **kwargs: object) -> BaseException:
    from mergekit.merge_methods.api import merge_tensors

    import mergekit_plugins  # noqa: F401

    with pytest.raises(Exception) as caught:
        merge_tensors(tensors, method, name="model.norm.weight", **kwargs)
    return caught.value


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_fused_rejects_what_stock_rejects_with_the_same_error(method: str) -> None:
    a, b = torch.randn(8), torch.randn(8)
    cases = [
        ({"parameters": {"weight": [1.0, 1.0]}}, [a, b, b]),  # no base
        ({"parameters": {}, "base_index": 0}, [a, b]),  # no weight
        ({"parameters": {"weight": [1.0]}, "base_index": 0}, [a, torch.randn(9)]),  # shapes
        ({"parameters": {"weight": [1.0], "densty": [1.0]}, "base_index": 0}, [a, b]),  # typo
    ]
    for kwargs, tensors in cases:
        stock = _error_of(method, tensors, **kwargs)
        fused = _error_of(f"{method}_fused", tensors, **kwargs)
        assert type(fused) is type(stock)
        assert str(fused) == str(stock).replace(method, f"{method}_fused")


@pytest.mark.parametrize("method", ["dare_ties_fused", "dare_linear_fused"])
def test_dare_fused_rejects_negative_density_and_bad_seed_clearly(method: str) -> None:
    a, b = torch.randn(8), torch.randn(8)
    error = _error_of(method, [a, b], parameters={"weight": [1], "density": [-0.1]}, base_index=0)
    assert isinstance(error, ValueError)
    assert "density -0.1" in str(error) and "model.norm.weight" in str(error)
    for seed in (-1, 2**63, 1.5):
        parameters = {"weight": [1], "seed": seed}
        error = _error_of(method, [a, b], parameters=parameters, base_index=0)
        assert isinstance(error, ValueError) and "seed" in str(error)


def test_a_non_finite_expert_is_named_with_the_tensor() -> None:
    a, b, c = torch.zeros(8), torch.ones(8), torch.ones(8)
    c[3] = float("nan")
    parameters = {"weight": [1.0, 1.0]}
    error = _error_of(
        "ties_fused", [a, b, c], parameters=parameters, base_index=0, ids=["base", "math", "code"]
    )
    assert isinstance(error, ValueError)
    assert "model.norm.weight" in str(error) and "expert 1 has 1 non-finite" in str(error)
    assert "1: 'code'" in str(error)


def test_mergekit_density_conventions_are_kept() -> None:
    """density >= 1 keeps all, density <= 0 drops the expert (its weight still divides)."""
    from mergekit.merge_methods.api import merge_tensors

    import mergekit_plugins  # noqa: F401

    torch.manual_seed(0)
    tensors = [torch.randn(64, 33) for _ in range(3)]
    for method, densities in [
        ("ties", [1.5, 0.0]),
        ("ties", [-0.5, 0.4]),
        ("dare_ties", [0.0, 1.0]),
        ("dare_linear", [0.0, 2.0]),
    ]:
        parameters = {"weight": [0.5, 0.75], "density": densities, "normalize": True}
        stock = merge_tensors(tensors, method, parameters=parameters, base_index=0)
        fused = merge_tensors(tensors, f"{method}_fused", parameters=parameters, base_index=0)
        torch.testing.assert_close(fused, stock, rtol=1e-6, atol=1e-7, msg=f"{method} {densities}")
