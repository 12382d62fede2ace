"""The Triton kernels (run by the Triton interpreter on CPU) against the torch reference.

Both backends compute the same decisions in the same order (deltas rounded to the compute dtype,
fp32 accumulation over experts in index order, one rounding at the end), so their outputs are
bit-identical; DARE's "l1" rescale is the exception: its L1 sums are reduced in a different order
(per kernel block vs per torch chunk), which moves the scale by a few fp32 ulps.

Inputs are fresh random tensors of odd shapes (never a multiple of the kernels' BLOCK), with
weights that are not all 1 (a negative and a zero one among them), densities in (0, 1] (1.0 and
tiny ones included), normalize on and off and lambda != 1. The interpreter runs about a million
elements per second, so the cases are a chosen cover of the options, not their product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from tests.merge_problems import Deltas, draw_problem
from triton_ops import dare_merge, task_arithmetic, ties_merge
from triton_ops.inputs import KEY_BITS
from triton_ops.merge_pass import BLOCK
from triton_ops.selection import magnitude_key, radix_select

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPE_NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16"}


@dataclass(frozen=True)
class Case:
    """One merge problem: how to draw the inputs and which options to merge them with."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    k: int
    seed: int
    deltas: Deltas = "gaussian"  # "quantized": many |delta| ties; "sparse": many zeros
    densities: tuple[float, ...] | None = None  # None: a random mix incl. 1.0 and a tiny one
    normalize: bool = False
    lambda_: float = 1.0
    stacked: bool = False  # experts as one [k, *shape] tensor instead of a list
    options: dict[str, object] = field(default_factory=dict)  # DARE: consensus, rescale, seed

    def __str__(self) -> str:
        parts = [
            "x".join(map(str, self.shape)),
            DTYPE_NAMES[self.dtype],
            f"k{self.k}",
            self.deltas,
            "norm" if self.normalize else "sum",
            f"lam{self.lambda_}",
            "stacked" if self.stacked else "list",
        ]
        parts += [f"{key}={value}" for key, value in self.options.items() if value]
        return "-".join(parts)


def draw_case(case: Case) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return draw_problem(case.shape, case.k, case.dtype, case.seed, case.deltas)


def draw_weights(case: Case) -> list[float]:
    generator = torch.Generator().manual_seed(case.seed + 1)
    weights = (torch.rand(case.k, generator=generator) * 2 - 0.5).tolist()
    if case.k == 1:
        return [0.6]
    weights[1] = -0.35  # a negative weight
    if case.k >= 3:
        weights[2] = 0.0  # and a zero one
    return weights


def draw_densities(case: Case) -> list[float]:
    if case.densities is not None:
        assert len(case.densities) == case.k
        return list(case.densities)
    generator = torch.Generator().manual_seed(case.seed + 2)
    densities = (0.05 + 0.9 * torch.rand(case.k, generator=generator)).tolist()
    if case.k >= 2:
        densities[0] = 1.0
    if case.k >= 4:
        densities[3] = 1e-4
    return densities


def experts_argument(case: Case, experts: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
    return torch.stack(experts) if case.stacked else experts


def assert_bit_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if not torch.equal(got, expected):
        differ = (got != expected).reshape(-1)
        first = int(torch.nonzero(differ)[0])
        got_value, expected_value = (
            got.reshape(-1)[first].item(),
            expected.reshape(-1)[first].item(),
        )
        pytest.fail(
            f"{int(differ.sum())} of {differ.numel()} entries differ; first at flat index {first}: "
            f"triton {got_value!r} vs torch {expected_value!r}"
        )


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each |value| (float64), the subnormal spacing near zero."""
    info = torch.finfo(dtype)
    mantissa_bits = {F32: 23, BF16: 7, F16: 10}[dtype]
    magnitude = values.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - mantissa_bits)


def assert_some_threshold_splits_ties(
    case: Case, base: torch.Tensor, experts: list[torch.Tensor]
) -> None:
    """Guard for the tie cases: some expert's threshold must drop part of a group of equal |delta|,
    so the kernels' tie-breaking path (`_threshold_ties_kernel`, BREAK_TIES) really runs."""
    splits = []
    for expert, density in zip(experts, draw_densities(case), strict=True):
        numel = base.numel()
        if density >= 1.0:
            continue
        key = magnitude_key((expert - base).reshape(-1))
        rank = max(1, int(density * numel)) - 1
        (bound,) = radix_select(lambda key=key: iter((key,)), [rank], KEY_BITS[case.dtype])
        splits.append(bound.position + 1 < bound.ties)
    assert any(splits), f"case {case} does not exercise tie-breaking"


# --- TIES -------------------------------------------------------------------------------------

TIES_CASES = [
    Case((37, 1001), F32, 5, seed=10, normalize=True),
    Case((37, 1001), BF16, 5, seed=11, lambda_=0.7, stacked=True),
    Case((37, 1001), F16, 2, seed=12, normalize=True, lambda_=1.3),
    Case((3, 5, 7), F32, 16, seed=13, normalize=True, lambda_=0.5),
    Case((3, 5, 7), BF16, 16, seed=14, stacked=True),
    Case((3, 5, 7), F16, 1, seed=15, densities=(0.5,), normalize=True),
    Case((1,), F32, 2, seed=16, densities=(0.3, 1e-6), normalize=True),
    Case((1,), BF16, 1, seed=17, densities=(1.0,), lambda_=-0.5),
    Case((65537,), BF16, 2, seed=18, densities=(1e-4, 0.3), normalize=True, lambda_=0.8),
    Case((65537,), F16, 1, seed=19, densities=(0.77,)),
    Case((65537,), F32, 1, seed=20, densities=(1e-5,), normalize=True, stacked=True),
]

# Many entries tied at the threshold, spread over several blocks (numel > 2 * BLOCK): the
# per-block tie counts and the lowest-index-first rule decide which ties survive.
TIES_TIE_CASES = [
    Case((5, 2001), BF16, 5, seed=30, deltas="quantized", normalize=True, lambda_=0.9),
    Case((10007,), F32, 3, seed=31, deltas="quantized", densities=(0.3, 1.0, 0.61)),
    Case((3, 3001), F16, 4, seed=32, deltas="quantized", normalize=True, stacked=True),
    Case((7, 1201), F32, 3, seed=33, deltas="sparse", densities=(0.05, 0.5, 0.2), normalize=True),
    Case((99, 101), BF16, 2, seed=34, deltas="sparse", densities=(0.95, 0.08)),
]


def run_ties(case: Case, backend: str) -> torch.Tensor:
    base, experts = draw_case(case)
    return ties_merge(
        base,
        experts_argument(case, experts),
        weights=draw_weights(case),
        densities=draw_densities(case),
        normalize=case.normalize,
        lambda_=case.lambda_,
        backend=backend,
    )


@pytest.mark.parametrize("case", TIES_CASES, ids=str)
def test_ties_triton_equals_torch_bit_for_bit(case: Case) -> None:
    assert math.prod(case.shape) % BLOCK != 0
    assert_bit_equal(run_ties(case, "triton"), run_ties(case, "torch"))


@pytest.mark.parametrize("case", TIES_TIE_CASES, ids=str)
def test_ties_triton_equals_torch_with_ties_at_the_threshold(case: Case) -> None:
    base, experts = draw_case(case)
    assert base.numel() > 2 * BLOCK
    assert_some_threshold_splits_ties(case, base, experts)
    expected = run_ties(case, "torch")
    assert_bit_equal(run_ties(case, "triton"), expected)
    assert not torch.equal(expected, base), "the merge must change something"


# --- DARE -------------------------------------------------------------------------------------


def dare_options(
    consensus: bool, rescale: str | None, seed: int = 0, stream: int = 0
) -> dict[str, object]:
    return {"consensus": consensus, "rescale": rescale, "seed": seed, "stream": stream}


DARE_CASES = [
    Case(
        (37, 1001), BF16, 5, 40, normalize=True, lambda_=0.8, options=dare_options(True, "inverse")
    ),
    Case((37, 1001), F32, 2, 41, options=dare_options(False, None)),
    Case(
        (37, 1001), F16, 5, 42, stacked=True, options=dare_options(False, "inverse", 2**62 + 7, 3)
    ),
    Case((3, 5, 7), F16, 16, 43, normalize=True, options=dare_options(False, "inverse")),
    Case((3, 5, 7), F32, 16, 44, lambda_=1.5, options=dare_options(True, None, seed=5)),
    Case((129, 257), BF16, 16, 45, options=dare_options(True, "inverse", stream=12345)),
    Case((1,), BF16, 1, 46, densities=(0.5,), options=dare_options(False, "inverse")),
    Case((65537,), F16, 2, 47, densities=(0.9, 1e-3), options=dare_options(True, "inverse", 99)),
    Case((65537,), F32, 1, 48, densities=(0.25,), lambda_=0.3, options=dare_options(False, None)),
]

DARE_L1_CASES = [
    Case((37, 1001), F32, 5, 50, normalize=True, options=dare_options(True, "l1")),
    Case((37, 1001), BF16, 3, 51, lambda_=0.6, options=dare_options(False, "l1")),
    Case((3, 5, 7), F16, 16, 52, stacked=True, options=dare_options(True, "l1")),
    Case((65537,), BF16, 2, 53, densities=(0.1, 0.9), options=dare_options(False, "l1", seed=3)),
    Case((65537,), F16, 1, 54, densities=(0.5,), options=dare_options(False, "l1")),
]


def run_dare(case: Case, backend: str) -> torch.Tensor:
    base, experts = draw_case(case)
    return dare_merge(
        base,
        experts_argument(case, experts),
        weights=draw_weights(case),
        densities=draw_densities(case),
        normalize=case.normalize,
        lambda_=case.lambda_,
        backend=backend,
        **case.options,
    )


@pytest.mark.parametrize("case", DARE_CASES, ids=str)
def test_dare_triton_equals_torch_bit_for_bit(case: Case) -> None:
    assert math.prod(case.shape) % BLOCK != 0
    assert_bit_equal(run_dare(case, "triton"), run_dare(case, "torch"))


@pytest.mark.parametrize("case", DARE_L1_CASES, ids=str)
def test_dare_l1_rescale_triton_matches_torch_up_to_summation_order(case: Case) -> None:
    # Same keep decisions (checked bit for bit without l1 above); only the L1 sums' order differs,
    # so the scale moves by a few fp32 ulps: at most one ulp of the output dtype in the result.
    got, expected = run_dare(case, "triton"), run_dare(case, "torch")
    assert got.dtype == expected.dtype and got.shape == expected.shape
    error = (got.double() - expected.double()).abs()
    # One ulp of the output, plus a few fp32 ulps of the summands (a scale a few ulps off moves
    # the merged delta by that much, also where it nearly cancels the base).
    base, _ = draw_case(case)
    summands = base.double().abs() + (expected.double() - base.double()).abs()
    tolerance = ulp(torch.maximum(got.double().abs(), expected.double().abs()), case.dtype)
    tolerance += 4 * ulp(summands, F32)
    assert bool((error <= tolerance).all()), f"max error {float(error.max())}"
    if case.dtype != F32:  # in fp32 most entries carry the scale's last bits
        assert float((got != expected).double().mean()) < 0.01, "more than a rounding difference"


# --- task arithmetic --------------------------------------------------------------------------

TASK_ARITHMETIC_CASES = [
    Case((37, 1001), BF16, 5, seed=60, normalize=True, lambda_=0.8),
    Case((37, 1001), F32, 2, seed=61, stacked=True),
    Case((3, 5, 7), F32, 16, seed=62, normalize=True, lambda_=1.7),
    Case((3, 5, 7), F16, 5, seed=63, lambda_=0.8),
    Case((65537,), F16, 2, seed=64, normalize=True),
    Case((65537,), BF16, 1, seed=65, lambda_=2.0, stacked=True),
    Case((1,), F32, 1, seed=66),
]


def run_task_arithmetic(
    case: Case, backend: str, weights: list[float] | None = None
) -> torch.Tensor:
    base, experts = draw_case(case)
    return task_arithmetic(
        base,
        experts_argument(case, experts),
        weights=draw_weights(case) if weights is None else weights,
        normalize=case.normalize,
        lambda_=case.lambda_,
        backend=backend,
    )


@pytest.mark.parametrize("case", TASK_ARITHMETIC_CASES, ids=str)
def test_task_arithmetic_triton_equals_torch_bit_for_bit(case: Case) -> None:
    assert_bit_equal(run_task_arithmetic(case, "triton"), run_task_arithmetic(case, "torch"))


def test_task_arithmetic_normalize_with_weights_summing_to_zero() -> None:
    # 0.1 + 0.2 - 0.3 is 5.6e-17, not 0: below mergekit's 1e-8 cut-off, so the sum is divided by
    # 1 instead; both backends must agree on that.
    case = Case((3001,), F32, 3, seed=67, normalize=True)
    weights = [0.1, 0.2, -0.3]
    got = run_task_arithmetic(case, "triton", weights)
    assert_bit_equal(got, run_task_arithmetic(case, "torch", weights))
    base, experts = draw_case(case)
    deltas = [expert - base for expert in experts]
    expected = base + sum(w * d for w, d in zip(weights, deltas, strict=True))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# --- shapes at the edges ----------------------------------------------------------------------

MERGES: dict[str, Callable[..., torch.Tensor]] = {
    "ties": lambda base, experts, backend: ties_merge(
        base, experts, weights=[0.5, 2.0], densities=[0.5, 1.0], backend=backend
    ),
    "dare": lambda base, experts, backend: dare_merge(
        base, experts, weights=[0.5, 2.0], densities=[0.5, 1.0], backend=backend
    ),
    "task_arithmetic": lambda base, experts, backend: task_arithmetic(
        base, experts, weights=[0.5, 2.0], backend=backend
    ),
}


@pytest.mark.parametrize("method", MERGES)
@pytest.mark.parametrize("shape", [(0,), (4, 0, 3)], ids=str)
def test_empty_tensors_merge_to_empty_tensors(method: str, shape: tuple[int, ...]) -> None:
    base = torch.empty(shape, dtype=BF16)
    outputs = [MERGES[method](base, [base, base], backend) for backend in ("triton", "torch")]
    for out in outputs:
        assert out.shape == shape and out.dtype == BF16


@pytest.mark.parametrize("method", MERGES)
def test_non_contiguous_inputs_merge_like_their_contiguous_copies(method: str) -> None:
    generator = torch.Generator().manual_seed(70)
    base = torch.randn(301, 53, generator=generator).t()  # transposed views
    experts = [(base.t() + 0.1 * torch.randn(301, 53, generator=generator)).t() for _ in range(2)]
    expected = MERGES[method](base.contiguous(), [e.contiguous() for e in experts], "torch")
    for backend in ("triton", "torch"):
        assert_bit_equal(MERGES[method](base, experts, backend), expected)
