"""Bad inputs raise an error that names the culprit and the fix; never a silently wrong tensor.

Every check runs for every merge function. Non-finite values are detected inside a pass the
kernels already make, so they are tested on both backends and on each code path that checks
them: TIES experts that are trimmed (the selection pass) and kept whole (the merge pass), DARE
with and without the L1 pass, and task arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from triton_ops import dare_merge, task_arithmetic, ties_merge

# The Triton interpreter computes with numpy, which warns about the overflows these tests provoke.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value")

BACKENDS = ("torch", "triton")
SHAPE = (3, 1001)  # two kernel blocks; bad values go into the ragged tail of the last one
LAST = (2, 1000)


def ties(base: object, experts: object, **overrides: object) -> torch.Tensor:
    k = _count(experts)
    return ties_merge(base, experts, **{"weights": [0.5] * k, "densities": [0.5] * k, **overrides})


def dare(base: object, experts: object, **overrides: object) -> torch.Tensor:
    k = _count(experts)
    return dare_merge(base, experts, **{"weights": [0.5] * k, "densities": [0.5] * k, **overrides})


def linear(base: object, experts: object, **overrides: object) -> torch.Tensor:
    return task_arithmetic(base, experts, **{"weights": [0.5] * _count(experts), **overrides})


def _count(experts: object) -> int:
    return len(experts) if isinstance(experts, list | tuple) else 1


MERGES: dict[str, Callable[..., torch.Tensor]] = {
    "ties": ties,
    "dare": dare,
    "task_arithmetic": linear,
}
SPARSIFYING = {"ties": ties, "dare": dare}


def problem(
    k: int = 3, dtype: torch.dtype = torch.bfloat16, shape: tuple[int, ...] = SHAPE
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator)
    experts = [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(k)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def raises(
    error: type[Exception], *fragments: str
) -> AbstractContextManager[pytest.ExceptionInfo[Exception]]:
    """pytest.raises whose message must contain every fragment (literally, in order)."""
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


# --- shapes, dtypes, devices ------------------------------------------------------------------


@pytest.mark.parametrize("method", MERGES)
def test_shape_mismatch_names_the_expert(method: str) -> None:
    base, experts = problem()
    experts[2] = experts[2][:, :-1]
    with raises(ValueError, "expert 2 has shape (3, 1000)", "(3, 1001)", "base's architecture"):
        MERGES[method](base, experts)


@pytest.mark.parametrize("method", MERGES)
def test_dtype_mismatch_names_the_expert(method: str) -> None:
    base, experts = problem()
    experts[1] = experts[1].to(torch.float16)
    with raises(ValueError, "expert 1 has dtype torch.float16", "expert.to(base.dtype)"):
        MERGES[method](base, experts)


@pytest.mark.gpu
@pytest.mark.parametrize("method", MERGES)
def test_device_mismatch_names_the_expert(method: str) -> None:
    base, experts = problem()
    base, experts = base.cuda(), [e.cuda() for e in experts]
    experts[1] = experts[1].cpu()
    with raises(ValueError, "expert 1 is on cpu", "move every tensor to one device"):
        MERGES[method](base, experts)


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_unsupported_dtype_is_refused(method: str, dtype: torch.dtype) -> None:
    base, experts = problem(dtype=dtype)
    with raises(ValueError, f"base has dtype {dtype}", "Cast the base and experts"):
        MERGES[method](base, experts)


@pytest.mark.parametrize("method", MERGES)
def test_non_tensor_inputs_raise_type_error(method: str) -> None:
    base, experts = problem()
    with raises(TypeError, "base must be a torch.Tensor, got list"):
        MERGES[method](base.tolist(), experts)
    experts[1] = experts[1].float().numpy()
    with raises(TypeError, "expert 1 must be a torch.Tensor, got ndarray"):
        MERGES[method](base, experts)


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize(
    "no_experts",
    [[], (), torch.empty((0, *SHAPE), dtype=torch.bfloat16)],
    ids=["empty list", "empty tuple", "empty stacked tensor"],
)
def test_zero_experts_is_refused(method: str, no_experts: object) -> None:
    base, _ = problem()
    merge = {"ties": ties_merge, "dare": dare_merge, "task_arithmetic": task_arithmetic}[method]
    options = {"weights": []} if method == "task_arithmetic" else {"weights": [], "densities": []}
    with raises(ValueError, "no experts given (k = 0)", "use the base tensor directly"):
        merge(base, no_experts, **options)


# --- per-expert parameters --------------------------------------------------------------------


@pytest.mark.parametrize("method", SPARSIFYING)
@pytest.mark.parametrize("density", [0.0, -0.1, 1.0000001, 2.0])
def test_density_outside_0_1_names_the_expert(method: str, density: float) -> None:
    base, experts = problem()
    with raises(ValueError, f"density of expert 1 is {density}", "must be in (0, 1]", "Use 1.0"):
        MERGES[method](base, experts, densities=[0.5, density, 0.5])


@pytest.mark.parametrize("method", SPARSIFYING)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_non_finite_density_is_refused(method: str, value: float) -> None:
    base, experts = problem()
    with raises(ValueError, f"densities[2] is {value}", "must be finite"):
        MERGES[method](base, experts, densities=[0.5, 0.5, value])


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("value", [float("nan"), float("-inf")], ids=str)
def test_non_finite_weight_is_refused(method: str, value: float) -> None:
    base, experts = problem()
    with raises(ValueError, f"weights[1] is {value}", "must be finite"):
        MERGES[method](base, experts, weights=[0.5, value, 0.5])


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("count", [2, 4])
def test_wrong_number_of_weights_is_refused(method: str, count: int) -> None:
    base, experts = problem()
    with raises(ValueError, f"got {count} weights for 3 experts", "exactly one per expert"):
        MERGES[method](base, experts, weights=[0.5] * count)


@pytest.mark.parametrize("method", SPARSIFYING)
@pytest.mark.parametrize("count", [1, 5])
def test_wrong_number_of_densities_is_refused(method: str, count: int) -> None:
    base, experts = problem()
    with raises(ValueError, f"got {count} densities for 3 experts", "exactly one per expert"):
        MERGES[method](base, experts, densities=[0.5] * count)


# --- shared options ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=str)
def test_non_finite_lambda_is_refused(method: str, value: float) -> None:
    base, experts = problem()
    with raises(ValueError, f"lambda_ is {value}", "must be finite"):
        MERGES[method](base, experts, lambda_=value)


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("backend", ["cuda", "Triton", ""])
def test_unknown_backend_is_refused(method: str, backend: str) -> None:
    base, experts = problem()
    with raises(ValueError, f"backend={backend!r}", "use 'auto', 'triton' or 'torch'"):
        MERGES[method](base, experts, backend=backend)


@pytest.mark.parametrize("method", MERGES)
def test_triton_backend_on_cpu_needs_the_interpreter(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base, experts = problem()
    with raises(ValueError, "needs CUDA tensors", "TRITON_INTERPRET=1", "backend='torch'"):
        MERGES[method](base, experts, backend="triton")


@pytest.mark.parametrize("rescale", ["l2", "L1", True, 1.0])
def test_unknown_rescale_is_refused(rescale: object) -> None:
    base, experts = problem()
    with raises(ValueError, f"rescale={rescale!r} is not supported", "'l1'", "'inverse'", "None"):
        dare(base, experts, rescale=rescale)


@pytest.mark.parametrize("name", ["seed", "stream"])
@pytest.mark.parametrize("value", [-1, 2**63, 1.5, True, "7"], ids=repr)
def test_bad_seed_or_stream_is_refused(name: str, value: object) -> None:
    base, experts = problem()
    with raises(ValueError, f"{name}={value!r} must be an integer in [0, 2**63)"):
        dare(base, experts, **{name: value})


# --- non-finite values, on every path that detects them ----------------------------------------

# name -> (merge, options): each detects non-finite deltas in a different pass.
DETECTING_PATHS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, object]]] = {
    "ties trimmed": (ties, {"densities": [0.5, 0.3, 0.9]}),
    "ties kept whole": (ties, {"densities": [0.5, 1.0, 0.9]}),
    "ties all kept": (ties, {"densities": [1.0, 1.0, 1.0]}),
    "dare l1": (dare, {"rescale": "l1", "consensus": True}),
    "dare inverse": (dare, {"rescale": "inverse"}),
    "dare no rescale": (dare, {"rescale": None, "consensus": True}),
    "task_arithmetic": (linear, {}),
}


def with_bad_expert(kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Expert 1 gets a non-finite delta at the tensor's last entry."""
    dtype = {"fp16 overflow": torch.float16, "fp32 overflow": torch.float32}.get(
        kind, torch.bfloat16
    )
    base, experts = problem(dtype=dtype)
    if kind.endswith("overflow"):
        # Both values are finite; their difference is not (60000 + 60000 > 65504 in fp16).
        big = 60000.0 if dtype == torch.float16 else 3e38
        base[LAST] = -big
        for expert in experts:
            expert[LAST] = -big
        experts[1][LAST] = big
    else:
        experts[1][LAST] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    return base, experts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", DETECTING_PATHS)
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "fp16 overflow", "fp32 overflow"])
def test_non_finite_expert_values_name_the_expert(kind: str, path: str, backend: str) -> None:
    merge, options = DETECTING_PATHS[path]
    base, experts = with_bad_expert(kind)
    assert torch.isfinite(base).all()
    with raises(ValueError, "expert 1 has 1 non-finite values", "torch.nan_to_num"):
        merge(base, experts, backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_delta_overflow_suggests_a_wider_dtype(backend: str) -> None:
    base, experts = with_bad_expert("fp16 overflow")
    with raises(ValueError, "expert 1", "overflow", "merge in float32 or bfloat16"):
        linear(base, experts, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", DETECTING_PATHS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_non_finite_base_values_name_the_base(value: float, path: str, backend: str) -> None:
    merge, options = DETECTING_PATHS[path]
    base, experts = problem()
    base[0, 0] = value
    with raises(ValueError, "the base tensor has 1 non-finite values", "Check the base checkpoint"):
        merge(base, experts, backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["ties trimmed", "dare inverse", "task_arithmetic"])
def test_the_first_of_several_bad_experts_is_named(path: str, backend: str) -> None:
    merge, options = DETECTING_PATHS[path]
    base, experts = problem()
    experts[0][1, 7] = float("nan")
    experts[2][LAST] = float("inf")
    experts[2][0, 0] = float("inf")
    with raises(ValueError, "expert 0 has 1 non-finite values"):
        merge(base, experts, backend=backend, **options)
