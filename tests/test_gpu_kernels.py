"""The Triton kernels on a CUDA device against the torch reference on the CPU, at real sizes.

Skipped without CUDA (conftest). The GPU may round an fp32 intermediate differently from the
CPU (division, a contracted multiply-add), so values are compared to one ulp of the output dtype
plus a few fp32 ulps of the summands; keep decisions (the TIES trim set, the DARE masks) must be
identical. Weights are powers of two and DARE densities are 1/2**j with the "inverse" rescale, so
every weighted delta is exact in fp32: the sign elections then see identical sums on both sides
and the comparison cannot trip over a near-zero sum that rounds to the other sign.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from tests.merge_problems import draw_problem
from triton_ops import breadcrumbs_merge, dare_merge, task_arithmetic, ties_merge
from triton_ops.keep_hash import draw, expert_key, keep_threshold

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
POWER_OF_TWO_WEIGHTS = (1.0, 0.5, -0.25, 2.0, 0.0, -1.0, 0.125, 0.5)


def on_device(base: torch.Tensor, experts: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    return base.to(DEVICE), [e.to(DEVICE) for e in experts]


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each |value| (float64), the subnormal spacing near zero."""
    mantissa_bits = {F32: 23, BF16: 7, F16: 10, torch.float64: 52}[dtype]
    magnitude = values.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - mantissa_bits)


def assert_within_one_ulp(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    """|got - expected| <= 1 ulp of the output dtype + 4 fp32 ulps of |base| + |merged delta|."""
    got = got.cpu()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.isfinite(got).all()
    error = (got.double() - expected.double()).abs()
    summands = base.double().abs() + (expected.double() - base.double()).abs()
    tolerance = ulp(torch.maximum(got.abs(), expected.abs()), expected.dtype) + 4 * ulp(
        summands, F32
    )
    worse = error > tolerance
    assert not worse.any(), (
        f"{int(worse.sum())} entries differ by more than an ulp; max error {float(error.max())}"
    )


Merge = Callable[..., torch.Tensor]


def compare_backends(
    merge: Merge, base: torch.Tensor, experts: list[torch.Tensor], **options: object
) -> torch.Tensor:
    """Run `merge` with the Triton kernels on the GPU and the torch path on the CPU; compare."""
    expected = merge(base, experts, backend="torch", **options)
    gpu_base, gpu_experts = on_device(base, experts)
    got = merge(gpu_base, gpu_experts, backend="triton", **options)
    assert got.is_cuda and got.device == gpu_base.device
    assert_within_one_ulp(got, expected, base)
    again = merge(gpu_base, gpu_experts, backend="triton", **options)
    assert torch.equal(got, again), "the kernels must be deterministic"
    assert not torch.equal(expected, base)
    return got


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "k", "densities", "normalize", "lambda_"),
    [
        ((4096, 4096), BF16, 8, (0.1, 1.0, 0.3, 1e-4, 0.5, 0.9, 0.2, 0.05), True, 1.0),
        ((4096, 4096), BF16, 8, (0.2,) * 8, False, 0.7),
        ((1000, 4097), F32, 5, (0.3, 0.5, 1.0, 0.01, 0.8), True, 1.0),
        ((1000, 4097), F16, 3, (0.25, 0.6, 1.0), False, 1.5),
    ],
)
def test_ties_on_gpu_matches_the_torch_reference(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    k: int,
    densities: tuple[float, ...],
    normalize: bool,
    lambda_: float,
) -> None:
    base, experts = draw_problem(shape, k, dtype, seed=k)
    compare_backends(
        ties_merge,
        base,
        experts,
        weights=list(POWER_OF_TWO_WEIGHTS[:k]),
        densities=list(densities),
        normalize=normalize,
        lambda_=lambda_,
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "k", "consensus", "rescale", "normalize"),
    [
        ((4096, 4096), BF16, 8, True, "inverse", False),
        ((1024, 4097), BF16, 8, False, "l1", True),
        ((1000, 4097), F32, 4, True, None, True),
        ((1000, 4097), F16, 4, False, "inverse", False),
    ],
)
def test_dare_on_gpu_matches_the_torch_reference(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    k: int,
    consensus: bool,
    rescale: str | None,
    normalize: bool,
) -> None:
    base, experts = draw_problem(shape, k, dtype, seed=10 + k)
    compare_backends(
        dare_merge,
        base,
        experts,
        weights=list(POWER_OF_TWO_WEIGHTS[:k]),
        densities=[(0.5, 0.25, 1.0, 0.125)[i % 4] for i in range(k)],
        consensus=consensus,
        rescale=rescale,
        normalize=normalize,
        seed=1234,
        stream=5,
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "k", "normalize", "lambda_"),
    [((4096, 4096), BF16, 8, True, 0.8), ((1000, 4097), F32, 3, False, 1.0)],
)
def test_task_arithmetic_on_gpu_matches_the_torch_reference(
    shape: tuple[int, ...], dtype: torch.dtype, k: int, normalize: bool, lambda_: float
) -> None:
    base, experts = draw_problem(shape, k, dtype, seed=20 + k)
    compare_backends(
        task_arithmetic,
        base,
        experts,
        weights=list(POWER_OF_TWO_WEIGHTS[:k]),
        normalize=normalize,
        lambda_=lambda_,
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "consensus", "rescale"),
    [((4096, 4096), BF16, True, False), ((1000, 4097), F32, False, True)],
)
def test_breadcrumbs_on_gpu_matches_the_torch_reference(shape, dtype, consensus, rescale) -> None:
    base, experts = draw_problem(shape, 4, dtype, seed=30)
    compare_backends(
        breadcrumbs_merge,
        base,
        experts,
        weights=list(POWER_OF_TWO_WEIGHTS[:4]),
        densities=[0.9, 0.5, 1.0, 0.2],
        gammas=[0.01, 0.1, 0.0, 0.3],
        consensus=consensus,
        normalize=consensus,
        rescale=rescale,
    )


def test_float64_on_gpu_matches_the_torch_reference() -> None:
    base, experts = draw_problem((1000, 4097), 3, torch.float64, seed=31)
    options = dict(weights=[1.0, 0.5, -0.25], densities=[0.3, 1.0, 0.6])
    expected = ties_merge(base, experts, backend="torch", **options)
    gpu_base, gpu_experts = on_device(base, experts)
    got = ties_merge(gpu_base, gpu_experts, backend="triton", **options).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# --- keep decisions, exactly ------------------------------------------------------------------


def test_ties_trim_set_on_gpu_equals_the_reference_with_many_ties() -> None:
    # One expert of weight 1 with small-integer deltas on an integer base: base + delta is exact,
    # so an entry is kept exactly when the output differs from the base; |delta| in {1, 2, 3}
    # puts the threshold inside a tie group of millions of entries across thousands of blocks.
    generator = torch.Generator().manual_seed(30)
    shape = (4096, 4096)
    base = torch.randint(-64, 65, shape, generator=generator).to(BF16)
    delta = torch.randint(1, 4, shape, generator=generator) * (
        torch.randint(0, 2, shape, generator=generator) * 2 - 1
    )
    expert = (base.float() + delta).to(BF16)
    options = dict(weights=[1.0], densities=[0.4], normalize=False)
    expected = ties_merge(base, [expert], backend="torch", **options) != base
    gpu_base, gpu_experts = on_device(base, [expert])
    got = ties_merge(gpu_base, gpu_experts, backend="triton", **options) != gpu_base
    assert int(got.sum()) == int(0.4 * base.numel())
    assert torch.equal(got.cpu(), expected)


def dare_keep_masks(numel: int, densities: list[float], backend: str, device: str) -> torch.Tensor:
    """[k, numel] keep masks decoded from one merge of power-of-two deltas on a zero base."""
    base = torch.zeros(numel, device=device)
    experts = [torch.full((numel,), float(2**i), device=device) for i in range(len(densities))]
    merged = dare_merge(
        base,
        experts,
        weights=[1.0] * len(densities),
        densities=densities,
        rescale=None,
        seed=77,
        stream=3,
        backend=backend,
    )
    bits = merged.cpu().to(torch.int64)
    return torch.stack([(bits >> i) & 1 == 1 for i in range(len(densities))])


def test_dare_keep_masks_on_gpu_equal_the_reference() -> None:
    densities = [0.1, 0.5, 0.9, 0.33]
    numel = 2**22 + 3
    got = dare_keep_masks(numel, densities, "triton", DEVICE)
    assert torch.equal(got, dare_keep_masks(numel, densities, "torch", "cpu"))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_kernels_launch_on_the_tensors_device() -> None:
    base, experts = draw_problem((333, 777), 3, BF16, seed=40)
    options = dict(weights=[1.0, 0.5, -0.25], densities=[0.3, 0.5, 1.0])
    expected = ties_merge(base, experts, backend="torch", **options)
    second = torch.device(DEVICE, 1)
    got = ties_merge(base.to(second), [e.to(second) for e in experts], backend="triton", **options)
    assert got.device == second
    assert_within_one_ulp(got, expected, base)


# --- tensors of more than 2**31 elements (int64 offsets) ---------------------------------------

HUGE_NUMEL = 2**31 + 2**17 + 3
# Nonzero deltas only in two regions: one across element 2**31, one at the very end. Everything
# else (more than 2**31 entries) has a zero delta, so one |delta| histogram bin alone holds more
# than 2**31 entries. Region starts are multiples of 4 (Philox draws come in fours).
REGIONS = ((2**31 - 2048, 2**31 + 2048), (HUGE_NUMEL - 60_003, HUGE_NUMEL))


def regions_of(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor[start:stop] for start, stop in REGIONS])


@pytest.fixture(scope="module")
def huge_problem() -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """bf16 base (0.5 everywhere) and two experts on the GPU, about 4.3 GB each."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * HUGE_NUMEL * 2:  # base, 2 experts, output and slack
        pytest.skip(f"needs {6 * HUGE_NUMEL * 2 / 2**30:.0f} GiB of free GPU memory")
    assert REGIONS[1][0] % 4 == 0 and REGIONS[0][0] % 4 == 0
    generator = torch.Generator().manual_seed(50)
    base = torch.full((HUGE_NUMEL,), 0.5, dtype=BF16, device=DEVICE)
    experts = [base.clone(), base.clone()]
    for expert in experts:
        for start, stop in REGIONS:
            magnitude = torch.randint(1, 9, (stop - start,), generator=generator) / 64
            sign = torch.randint(0, 2, (stop - start,), generator=generator) * 2 - 1
            expert[start:stop] = (0.5 + magnitude * sign).to(BF16).to(DEVICE)
    yield base, experts
    del base, experts
    torch.cuda.empty_cache()


def assert_equal_outside_regions(out: torch.Tensor, base: torch.Tensor) -> None:
    previous = 0
    for start, stop in REGIONS:
        assert torch.equal(out[previous:start], base[previous:start])
        previous = stop
    assert torch.equal(out[previous:], base[previous:])


def test_ties_beyond_2_to_31_elements(huge_problem: tuple[torch.Tensor, list]) -> None:
    # The nonzero deltas are the only candidates for the top k, so the merge of the regions
    # alone (on the CPU, with a density giving the same k) is the expected result there.
    base, experts = huge_problem
    kept = 30_000
    density = (kept + 0.5) / HUGE_NUMEL
    assert int(density * HUGE_NUMEL) == kept
    options = dict(weights=[1.0, 0.5], normalize=True)
    out = ties_merge(base, experts, densities=[density, density], backend="triton", **options)
    small_base, small_experts = regions_of(base).cpu(), [regions_of(e).cpu() for e in experts]
    small_density = (kept + 0.5) / small_base.numel()
    assert int(small_density * small_base.numel()) == kept
    expected = ties_merge(
        small_base, small_experts, densities=[small_density] * 2, backend="torch", **options
    )
    assert_within_one_ulp(regions_of(out), expected, small_base)
    assert_equal_outside_regions(out, base)


def test_dare_beyond_2_to_31_elements(huge_problem: tuple[torch.Tensor, list]) -> None:
    # The keep decision of element i is Philox draw i of the expert's key, whatever the tensor.
    base, experts = huge_problem
    weights, densities, seed = [1.0, -0.5], [0.5, 0.25], 9
    out = dare_merge(
        base,
        experts,
        weights=weights,
        densities=densities,
        rescale="inverse",
        seed=seed,
        backend="triton",
    )
    for start, stop in REGIONS:
        mixed = torch.zeros(stop - start, dtype=torch.float32)
        region_base = base[start:stop].cpu()
        for i, expert in enumerate(experts):
            key = expert_key(seed, 0, i)
            draws = torch.tensor([draw(key, index) for index in range(start, stop)])
            keep = draws < keep_threshold(densities[i])
            delta = (expert[start:stop].cpu() - region_base).float()
            mixed += torch.where(keep, delta * (weights[i] / densities[i]), 0.0)
        expected = (region_base.float() + mixed).to(BF16)
        assert_within_one_ulp(out[start:stop], expected, region_base)
    assert_equal_outside_regions(out, base)


def test_task_arithmetic_beyond_2_to_31_elements(huge_problem: tuple[torch.Tensor, list]) -> None:
    base, experts = huge_problem
    out = task_arithmetic(base, experts, weights=[0.5, 0.25], lambda_=2.0, backend="triton")
    small_base, small_experts = regions_of(base).cpu(), [regions_of(e).cpu() for e in experts]
    expected = task_arithmetic(
        small_base, small_experts, weights=[0.5, 0.25], lambda_=2.0, backend="torch"
    )
    assert_within_one_ulp(regions_of(out), expected, small_base)
    assert_equal_outside_regions(out, base)
