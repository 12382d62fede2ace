"""The torch reference against mergekit itself (`mergekit.merge_methods.api.merge_tensors`).

numerics.md's comparison rules:
- float32: equal to mergekit up to summation order (relative error ~1e-6).
- bfloat16 / float16: mergekit rounds weighted deltas and sums to the compute dtype, the fused
  path accumulates in fp32 and rounds once. Against a float64 evaluation of the same decisions
  (our exact top-k trim set, sign elected from the float64 sum, float64 disjoint mean), every
  entry's error must be at most mergekit's plus one ulp of the output dtype at that value.
- Trim decisions equal mergekit's `magnitude()` kept set wherever no |delta| ties the threshold
  (mergekit's argsort order among ties is arbitrary).
DARE's random masks cannot match mergekit's `torch.bernoulli` stream, so DARE is compared at
density 1 (nothing dropped); its statistics are in test_dare.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors
from mergekit.sparsify import magnitude

from tests.merge_problems import draw_problem
from triton_ops import dare_merge, task_arithmetic, ties_merge
from triton_ops.inputs import KEY_BITS
from triton_ops.selection import magnitude_key, radix_select

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)
# Dyadic weights (a negative and a zero one among them) are exact in bf16 and fp16, so
# mergekit's rounding of the weights to the compute dtype does not enter the comparison.
WEIGHTS = (1.0, 0.5, -0.75, 0.0, 1.25)


@dataclass(frozen=True)
class Problem:
    base: torch.Tensor
    experts: list[torch.Tensor]
    weights: list[float]


def weighted_problem(shape: tuple[int, ...], dtype: torch.dtype, k: int, seed: int) -> Problem:
    base, experts = draw_problem(shape, k, dtype, seed)
    return Problem(base, experts, [WEIGHTS[i % len(WEIGHTS)] for i in range(k)])


def run_mergekit(method: str, problem: Problem, **parameters: object) -> torch.Tensor:
    return merge_tensors(
        [problem.base, *problem.experts],
        method,
        parameters={"weight": problem.weights, **parameters},
        base_index=0,
    )


# --- a float64 evaluation of the same decisions -----------------------------------------------


def top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Our trim set: the exact top-k |delta| (ties lowest index first), via the radix select."""
    flat = delta.reshape(-1)
    if density >= 1.0:
        return torch.ones_like(flat, dtype=torch.bool).reshape(delta.shape)
    key = magnitude_key(flat).long()
    rank = max(1, int(density * flat.numel())) - 1
    (threshold,) = radix_select(lambda: iter((magnitude_key(flat),)), [rank], KEY_BITS[delta.dtype])
    tied = key == threshold.key
    tie_rank = torch.cumsum(tied.long(), 0) - tied.long()
    kept = (key > threshold.key) | (tied & (tie_rank <= threshold.position))
    return kept.reshape(delta.shape)


def merge_float64(
    problem: Problem,
    kept: Sequence[torch.Tensor],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """numerics.md steps 3-5 in float64, given the kept masks (steps 1-2's decisions).

    Deltas are formed in the compute dtype (the decision inputs), everything after is exact
    enough to serve as the true value.
    """
    base = problem.base.double()
    weighted = [
        torch.where(mask, (expert - problem.base).double(), 0.0) * weight
        for expert, mask, weight in zip(problem.experts, kept, problem.weights, strict=True)
    ]
    if consensus:
        elected_positive = sum(weighted) >= 0  # a zero sum counts as +
        agree = [torch.where(elected_positive, w > 0, w < 0) for w in weighted]
        mixed = sum(torch.where(a, w, 0.0) for a, w in zip(agree, weighted, strict=True))
        divisor = sum(a.double() * weight for a, weight in zip(agree, problem.weights, strict=True))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(weighted)
        divisor = sum(problem.weights)
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each |value| (float64), the subnormal spacing near zero."""
    mantissa_bits = {F32: 23, BF16: 7, F16: 10}[dtype]
    magnitude = values.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - mantissa_bits)


def assert_at_least_as_accurate_as_mergekit(
    ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor
) -> None:
    """|ours - truth| <= |mergekit - truth| + 1 ulp of the output dtype, entry by entry."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == truth.shape
    our_error = (ours.double() - truth).abs()
    their_error = (theirs.double() - truth).abs()
    allowed = their_error + ulp(torch.maximum(ours.double().abs(), truth.abs()), ours.dtype)
    worse = our_error > allowed
    if worse.any():
        i = int(torch.nonzero(worse.reshape(-1))[0])
        pytest.fail(
            f"{int(worse.sum())} entries less accurate than mergekit; first at {i}: ours "
            f"{ours.reshape(-1)[i].item()}, mergekit {theirs.reshape(-1)[i].item()}, "
            f"float64 {truth.reshape(-1)[i].item()}"
        )
    # Accumulating in fp32 must actually help: overall, our error is no larger than mergekit's.
    assert float(our_error.sum()) <= float(their_error.sum())


def assert_float32_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal up to summation order: a few fp32 ulps of the output (values are of order 1)."""
    assert ours.dtype == theirs.dtype == F32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# --- TIES -------------------------------------------------------------------------------------

TIES_SETTINGS = [
    # shape, k, densities, normalize, lambda
    ((37, 1001), 5, (0.3, 0.5, 1.0, 0.05, 0.9), True, 1.0),
    ((3, 5, 7), 3, (0.2, 0.7, 0.01), False, 0.7),
    ((20011,), 2, (1e-4, 0.29), True, 1.3),
    ((1,), 1, (0.5,), True, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "k", "densities", "normalize", "lambda_"), TIES_SETTINGS)
def test_ties_matches_mergekit(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    k: int,
    densities: tuple[float, ...],
    normalize: bool,
    lambda_: float,
) -> None:
    problem = weighted_problem(shape, dtype, k, seed=sum(shape) + k)
    ours = ties_merge(
        problem.base,
        problem.experts,
        weights=problem.weights,
        densities=densities,
        normalize=normalize,
        lambda_=lambda_,
        backend="torch",
    )
    theirs = run_mergekit(
        "ties", problem, density=list(densities), normalize=normalize, **{"lambda": lambda_}
    )
    if dtype == F32:
        assert_float32_matches(ours, theirs)
        return
    kept = [
        top_k_mask(e - problem.base, d) for e, d in zip(problem.experts, densities, strict=True)
    ]
    truth = merge_float64(problem, kept, consensus=True, normalize=normalize, lambda_=lambda_)
    assert_at_least_as_accurate_as_mergekit(ours, theirs, truth)


# --- DARE at density 1 and task arithmetic ----------------------------------------------------

LINEAR_SETTINGS = [
    # shape, k, normalize, lambda
    ((37, 1001), 5, False, 1.0),
    ((3, 5, 7), 16, True, 0.8),
    ((20011,), 2, True, 1.0),
    ((1,), 1, False, 0.5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize(("shape", "k", "normalize", "lambda_"), LINEAR_SETTINGS)
def test_dare_at_density_one_matches_mergekit(
    method: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    k: int,
    normalize: bool,
    lambda_: float,
) -> None:
    problem = weighted_problem(shape, dtype, k, seed=sum(shape) + 2 * k)
    consensus = method == "dare_ties"
    ours = dare_merge(
        problem.base,
        problem.experts,
        weights=problem.weights,
        densities=[1.0] * k,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        rescale="l1",  # mergekit's default for both methods; a no-op when nothing is dropped
        seed=123,
        backend="torch",
    )
    theirs = run_mergekit(method, problem, density=1.0, normalize=normalize, **{"lambda": lambda_})
    if dtype == F32:
        assert_float32_matches(ours, theirs)
        return
    keep_all = [torch.ones(shape, dtype=torch.bool)] * k
    truth = merge_float64(
        problem, keep_all, consensus=consensus, normalize=normalize, lambda_=lambda_
    )
    assert_at_least_as_accurate_as_mergekit(ours, theirs, truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "k", "normalize", "lambda_"), LINEAR_SETTINGS)
def test_task_arithmetic_matches_mergekit(
    dtype: torch.dtype, shape: tuple[int, ...], k: int, normalize: bool, lambda_: float
) -> None:
    problem = weighted_problem(shape, dtype, k, seed=sum(shape) + 3 * k)
    ours = task_arithmetic(
        problem.base,
        problem.experts,
        weights=problem.weights,
        normalize=normalize,
        lambda_=lambda_,
        backend="torch",
    )
    theirs = run_mergekit("task_arithmetic", problem, normalize=normalize, **{"lambda": lambda_})
    if dtype == F32:
        assert_float32_matches(ours, theirs)
        return
    keep_all = [torch.ones(shape, dtype=torch.bool)] * k
    truth = merge_float64(problem, keep_all, consensus=False, normalize=normalize, lambda_=lambda_)
    assert_at_least_as_accurate_as_mergekit(ours, theirs, truth)


def test_task_arithmetic_normalize_with_zero_weight_sum_matches_mergekit() -> None:
    # 0.1 + 0.2 - 0.3 is 5.6e-17, not 0: below mergekit's 1e-8 cut-off, so it divides by 1.
    base, experts = draw_problem((1001,), 3, F32, seed=5)
    problem = Problem(base, experts, [0.1, 0.2, -0.3])
    ours = task_arithmetic(
        problem.base, problem.experts, weights=problem.weights, normalize=True, backend="torch"
    )
    assert_float32_matches(ours, run_mergekit("task_arithmetic", problem, normalize=True))


# --- trim decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [1e-4, 0.05, 0.29, 0.5, 0.9])
def test_trim_decisions_match_mergekit_magnitude(dtype: torch.dtype, density: float) -> None:
    generator = torch.Generator().manual_seed(int(density * 1e4))
    delta = (0.01 * torch.randn(20011, generator=generator)).to(dtype)
    delta = torch.where(delta == 0, torch.finfo(dtype).tiny, delta)  # kept ⇔ mergekit output != 0
    ours = top_k_mask(delta, density)
    theirs = magnitude(delta, density) != 0
    k = max(1, int(density * delta.numel()))
    assert int(ours.sum()) == int(theirs.sum()) == k
    key = magnitude_key(delta)
    threshold_key = int(key[ours].min())
    untied = key != threshold_key
    assert torch.equal(ours[untied], theirs[untied])
    if int((key == threshold_key).sum()) == int((ours & ~untied).sum()):
        assert torch.equal(ours, theirs)  # the threshold splits no tie: the kept sets are equal


def test_trim_decisions_match_mergekit_when_no_ties_exist() -> None:
    # Distinct magnitudes everywhere: mergekit's arbitrary tie order plays no part.
    generator = torch.Generator().manual_seed(3)
    delta = torch.randperm(5003, generator=generator).float().add(1.0) * 1e-3
    delta = delta * (torch.randint(0, 2, (5003,), generator=generator) * 2 - 1)
    for density in (1e-3, 0.123, 0.5, 0.999):
        assert torch.equal(top_k_mask(delta, density), magnitude(delta, density) != 0)


# --- sign election edge cases, exactly as mergekit decides them -------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("normalize", [True, False])
def test_sign_election_edge_cases_match_mergekit(backend: str, normalize: bool) -> None:
    # Weights 1, 1, -1, 0; per entry, the weighted deltas are:
    # 0: +1, -1          sum zero: elects +, so expert 0 alone survives
    # 1: +1, +1 (w = -1) both agree, but their weights sum to zero: divisor falls back to 1
    # 2: 0 (w = 0)       a zero-weight expert never agrees: the base stays
    # 3: +0.5, -2        majority -, expert 1 alone
    # 4: -1, -3          majority -, both: divided by 2 when normalizing
    base = torch.ones(5)
    deltas = [
        [1.0, 1.0, 0.0, 0.5, -1.0],
        [-1.0, 0.0, 0.0, -2.0, -3.0],
        [0.0, -1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 3.0, 0.0, 0.0],
    ]
    problem = Problem(base, [base + torch.tensor(d) for d in deltas], [1.0, 1.0, -1.0, 0.0])
    ours = ties_merge(
        base,
        problem.experts,
        weights=problem.weights,
        densities=[1.0] * 4,
        normalize=normalize,
        backend=backend,
    )
    expected = [2.0, 3.0, 1.0, -1.0, -1.0 if normalize else -3.0]
    assert ours.tolist() == expected
    assert torch.equal(ours, run_mergekit("ties", problem, density=1.0, normalize=normalize))
