"""DARE's counter-based randomness and rescaling.

An entry's keep decision is a pure function of (seed, stream, expert index, element index): the
31-bit draw of keep_hash (lowbias32 of the element's index keyed per expert and 2**32-element
word) compared with `density * 2**31`. Keep masks are observed
through the public `dare_merge`: on a zero base, expert i's delta is 2**i everywhere, so with
weights 1, no rescale and no consensus the merged value's bit i says whether expert i's entry
was kept.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from tests.merge_problems import draw_problem
from triton_ops import dare_merge, reference, task_arithmetic, tensor_stream
from triton_ops.keep_hash import draw, expert_key, keep_bits, keep_threshold, word_keys
from triton_ops.kernel_utils import random_keep

BACKENDS = ("torch", "triton")
REPO = Path(__file__).resolve().parents[1]


def keep_masks(
    numel: int,
    densities: list[float],
    *,
    seed: int = 0,
    stream: int = 0,
    backend: str = "torch",
    shape: tuple[int, ...] | None = None,
) -> list[torch.Tensor]:
    """Each expert's flat keep mask, decoded from one merge of power-of-two deltas."""
    shape = (numel,) if shape is None else shape
    base = torch.zeros(shape)
    experts = [torch.full(shape, float(2**i)) for i in range(len(densities))]
    merged = dare_merge(
        base,
        experts,
        weights=[1.0] * len(densities),
        densities=densities,
        rescale=None,
        seed=seed,
        stream=stream,
        backend=backend,
    )
    bits = merged.reshape(-1).to(torch.int64)
    assert torch.equal(bits.float(), merged.reshape(-1)), "sums of powers of two are integers"
    return [(bits >> i) & 1 == 1 for i in range(len(densities))]


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(n * p * (1 - p))


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", ["l1", "inverse", None])
def test_same_seed_gives_bit_identical_output(rescale: str | None) -> None:
    base, experts = draw_problem((33, 301), 3, torch.bfloat16, seed=1)
    options = dict(
        weights=[0.7, -0.2, 1.1],
        densities=[0.3, 0.6, 0.9],
        consensus=True,
        rescale=rescale,
        seed=2024,
        stream=7,
    )
    runs = {
        b: [dare_merge(base, experts, backend=b, **options) for _ in range(2)] for b in BACKENDS
    }
    for first, second in runs.values():
        assert torch.equal(first, second)
    if rescale != "l1":  # l1 sums are reduced in backend-specific order: see test_triton_vs_torch
        assert torch.equal(runs["torch"][0], runs["triton"][0])
    assert not torch.equal(runs["torch"][0], base)


def test_keep_masks_are_identical_across_backends() -> None:
    torch_masks = keep_masks(5001, [0.3, 0.5, 0.8], seed=11, stream=2, backend="torch")
    triton_masks = keep_masks(5001, [0.3, 0.5, 0.8], seed=11, stream=2, backend="triton")
    for triton_mask, torch_mask in zip(triton_masks, torch_masks, strict=True):
        assert torch.equal(triton_mask, torch_mask)


def test_seed_stream_and_expert_index_give_independent_masks() -> None:
    # With density 1/2, two independent masks agree on half the entries (binomial noise);
    # equal masks agree everywhere and correlated ones well above half.
    n, density = 40_000, 0.5
    masks = {
        "expert 0": keep_masks(n, [density, density], seed=1)[0],
        "expert 1": keep_masks(n, [density, density], seed=1)[1],
        "seed 2": keep_masks(n, [density], seed=2)[0],
        "stream 1": keep_masks(n, [density], seed=1, stream=1)[0],
        "seed 2**40": keep_masks(n, [density], seed=2**40)[0],
    }
    names = list(masks)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            agree = int((masks[first] == masks[second]).sum())
            assert abs(agree - n / 2) <= binomial_bound(n, 0.5), (first, second, agree)


def test_keep_decision_depends_only_on_seed_stream_expert_and_element() -> None:
    densities = [0.4, 0.7, 0.2]
    masks = keep_masks(3000, densities, seed=9, stream=4)
    # Not on the number of experts or the other experts' densities ...
    assert torch.equal(keep_masks(3000, [0.4], seed=9, stream=4)[0], masks[0])
    assert torch.equal(keep_masks(3000, [0.4, 0.1, 0.9], seed=9, stream=4)[0], masks[0])
    # ... nor on the tensor's shape or length: a shorter tensor gets a prefix of the mask.
    assert torch.equal(keep_masks(3000, densities, seed=9, stream=4, shape=(30, 100))[2], masks[2])
    assert torch.equal(keep_masks(1234, densities, seed=9, stream=4)[1], masks[1][:1234])


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_decisions_do_not_depend_on_block_or_chunk_size(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10_000 elements: one chunk of the torch path, five blocks of the kernels; then the torch
    # path again with chunks of 1028 elements (not a divisor of the kernels' block either).
    densities = [0.35, 0.65]
    masks = keep_masks(10_000, densities, seed=5, backend=backend)
    base, experts = draw_problem((10_000,), 2, torch.float16, seed=3)
    options = dict(weights=[0.9, 0.4], densities=densities, consensus=True, rescale="inverse")
    merged = dare_merge(base, experts, seed=5, backend=backend, **options)
    monkeypatch.setattr(reference, "CHUNK", 1028)
    rechunked = keep_masks(10_000, densities, seed=5, backend="torch")
    for mask, expected in zip(rechunked, masks, strict=True):
        assert torch.equal(mask, expected)
    assert torch.equal(dare_merge(base, experts, seed=5, backend="torch", **options), merged)


def test_tensor_stream_is_a_stable_hash_of_the_name() -> None:
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", ""]
    streams = [tensor_stream(name) for name in names]
    assert len(set(streams)) == len(names)
    assert all(0 <= stream < 2**63 for stream in streams)
    # Python's own str hash is salted per process; the stream must not be.
    code = f"from triton_ops import tensor_stream; print(tensor_stream({names[0]!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO
    )
    assert int(other.stdout) == streams[0]
    first, second = (keep_masks(4000, [0.5], stream=s)[0] for s in streams[:2])
    assert not torch.equal(first, second)


# --- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.001, 0.05, 0.3, 0.5, 0.77, 0.999])
def test_kept_fraction_is_the_density_within_binomial_noise(density: float) -> None:
    n = 100_000
    mask0, mask1 = keep_masks(n, [density, density], seed=int(density * 1000))
    for mask in (mask0, mask1):
        assert abs(int(mask.sum()) - n * density) <= binomial_bound(n, density)


def test_kept_fraction_under_the_triton_interpreter() -> None:
    n, density = 30_001, 0.37
    (mask,) = keep_masks(n, [density], seed=77, backend="triton")
    assert abs(int(mask.sum()) - n * density) <= binomial_bound(n, density)


@pytest.mark.parametrize("backend", BACKENDS)
def test_density_one_keeps_every_entry(backend: str) -> None:
    masks = keep_masks(10_007, [1.0, 0.999, 1.0], seed=8, backend=backend)
    assert bool(masks[0].all()) and bool(masks[2].all())
    assert not bool(masks[1].all())  # 0.999 drops about ten entries


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", ["l1", "inverse", None])
def test_dare_at_density_one_is_task_arithmetic(backend: str, rescale: str | None) -> None:
    base, experts = draw_problem((77, 131), 3, torch.bfloat16, seed=4)
    weights = [0.5, -1.5, 0.25]
    merged = dare_merge(
        base, experts, weights=weights, densities=[1.0] * 3, rescale=rescale, backend=backend
    )
    assert torch.equal(merged, task_arithmetic(base, experts, weights=weights, backend=backend))


def test_inverse_rescale_is_unbiased_in_expectation() -> None:
    # E[keep / density] = 1: averaged over many seeds the merged delta approaches the full delta.
    # Per entry, the mean of S draws of delta * Bernoulli(p) / p has standard deviation
    # |delta| * sqrt((1 - p) / (p * S)).
    n, seeds, density = 2000, 400, 0.3
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(n, generator=generator)
    base = torch.zeros(n)
    total = torch.zeros(n, dtype=torch.float64)
    for seed in range(seeds):
        merged = dare_merge(
            base, [delta], weights=[1.0], densities=[density], rescale="inverse", seed=seed
        )
        total += merged.double()
    mean = total / seeds
    z = (mean - delta.double()) / (
        delta.double().abs() * math.sqrt((1 - density) / (density * seeds))
    )
    assert float(z.abs().max()) < 6.0  # every entry within 6 sigma
    assert abs(float(z.mean())) < 5.0 / math.sqrt(n)  # and no overall bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_rescale_divides_kept_deltas_by_the_density(backend: str) -> None:
    delta = torch.randn(4099, generator=torch.Generator().manual_seed(6))
    merged = dare_merge(
        torch.zeros(4099),
        [delta],
        weights=[0.5],
        densities=[0.4],
        rescale="inverse",
        seed=3,
        backend=backend,
    )
    kept = merged != 0
    assert 0.35 < float(kept.double().mean()) < 0.45
    torch.testing.assert_close(merged[kept], delta[kept] * 0.5 / 0.4, rtol=2e-7, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_l1_rescale_matches_the_full_delta_l1_norm_like_mergekit(
    backend: str, density: float
) -> None:
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

    generator = torch.Generator().manual_seed(int(density * 10))
    delta = torch.randn(20_011, generator=generator) * torch.rand(20_011, generator=generator)
    merged = dare_merge(
        torch.zeros_like(delta),
        [delta],
        weights=[1.0],
        densities=[density],
        seed=1,
        backend=backend,
    )
    kept = merged != 0
    assert abs(int(kept.sum()) - density * delta.numel()) <= binomial_bound(delta.numel(), density)
    # mergekit's rule: sum |kept * scale| == sum |delta|, one scale for the whole tensor.
    torch.testing.assert_close(
        merged.double().abs().sum(), delta.double().abs().sum(), rtol=1e-6, atol=0.0
    )
    scales = merged[kept].double() / delta[kept].double()
    assert float(scales.max() - scales.min()) <= 4 * 2**-24 * float(scales.mean())
    expected = rescaled_masked_tensor(delta, kept.float(), RescaleNorm.l1)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l1_rescale_is_skipped_for_norms_below_1e_minus_7(backend: str) -> None:
    # mergekit leaves the kept deltas unscaled when either L1 norm is below 1e-7.
    delta = torch.full((1001,), 1e-11)
    merged = dare_merge(
        torch.zeros(1001), [delta], weights=[1.0], densities=[0.5], seed=2, backend=backend
    )
    kept = merged != 0
    assert 0 < int(kept.sum()) < 1001
    assert torch.equal(merged[kept], delta[kept])


# --- the generator: one definition, the torch path and the kernels --------------------------------


def draws_by_definition(key: int, start: int, count: int) -> list[int]:
    return [draw(key, index) for index in range(start, start + count)]


def torch_keep(key: int, start: int, count: int, threshold: int) -> list[bool]:
    iota = torch.arange(count, dtype=torch.int32)
    out, scratch = torch.empty_like(iota), torch.empty_like(iota)
    return (keep_bits(key, start, threshold, iota=iota, out=out, scratch=scratch) != 0).tolist()


@triton.jit
def _random_keep_kernel(word_key_ptr, out_ptr, start, threshold, num_words, BLOCK: tl.constexpr):
    offsets = start.to(tl.int64) + tl.arange(0, BLOCK)  # int64, as the kernels' own offsets
    keep = random_keep(word_key_ptr, 0, num_words, offsets, offsets >= 0, threshold)
    tl.store(out_ptr + tl.arange(0, BLOCK), keep.to(tl.int8))


# Element indices at 0, across 2**31 and 2**32 (a new word key), and far beyond.
STARTS = [0, 4096, 2**31 - 64, 2**32 - 64, 2**32 + 64, 2**34 - 64, 2**40 + 12]
KEYS = [expert_key(0, 0, 0), expert_key(123, 4, 7), 1, 2**64 - 1]


@pytest.mark.parametrize("key", KEYS, ids=hex)
@pytest.mark.parametrize("start", STARTS, ids=hex)
def test_torch_keep_bits_are_the_definition(key: int, start: int) -> None:
    threshold = keep_threshold(0.4)
    count = 64 if start % 2**16 + 64 <= 2**16 else 2**16 - start % 2**16
    expected = [d < threshold for d in draws_by_definition(key, start, count)]
    assert torch_keep(key, start, count, threshold) == expected


@pytest.mark.parametrize("start", [0, 2**32 - 1024, 2**32, 2**34 + 2048], ids=hex)
def test_kernel_keep_mask_is_the_definition(start: int) -> None:
    key, block, threshold = expert_key(42, 1, 3), 1024, keep_threshold(0.5)
    words = word_keys(key, start + block)
    table = torch.tensor([w & 0xFFFFFFFF for w in words], dtype=torch.int64)
    out = torch.empty(block, dtype=torch.int8)
    _random_keep_kernel[(1,)](table, out, start, threshold, len(words), BLOCK=block)
    expected = [d < threshold for d in draws_by_definition(key, start, block)]
    assert out.bool().tolist() == expected


def test_keep_threshold_is_density_times_2_to_31() -> None:
    assert keep_threshold(1.0) == 2**31  # above every 31-bit draw: keep all
    assert keep_threshold(0.5) == 2**30
    assert keep_threshold(0.25) == 2**29


# --- the generator's statistical quality ----------------------------------------------------


def uniform_draws(key: int, n: int) -> torch.Tensor:
    return torch.tensor(draws_by_definition(key, 0, n), dtype=torch.float64) / 2**31


def test_draws_are_uniform() -> None:
    # Chi-square over 64 equal bins of the draw, and of its low 6 bits (the bits a weak hash of a
    # counter leaves least mixed): 63 degrees of freedom, 99.9% quantile about 104.
    n = 64_000
    values = torch.tensor(draws_by_definition(expert_key(7, 3, 1), 0, n))
    for bins in (values >> 25, values & 63):
        counts = torch.bincount(bins, minlength=64).double()
        chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
        assert chi2 < 104, chi2


@pytest.mark.parametrize("lag", [1, 2, 4, 2048, 2**16])
def test_neighbouring_entries_are_uncorrelated(lag: int) -> None:
    # Pearson correlation of draws `lag` apart: for independent draws about N(0, 1/n).
    n = 50_000
    values = uniform_draws(expert_key(11, 0, 2), n + lag)
    correlation = float(torch.corrcoef(torch.stack([values[:n], values[lag:]]))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(n)


def test_experts_differing_in_one_key_bit_are_uncorrelated() -> None:
    # The worst case for a keyed hash: keys one bit apart. Keys come from splitmix64, but the
    # word key itself may differ in any single bit.
    n = 20_000
    base_key = expert_key(5, 5, 5)
    first = uniform_draws(base_key, n)
    for bit in (0, 7, 31, 45, 63):
        other = uniform_draws(base_key ^ (1 << bit), n)
        correlation = float(torch.corrcoef(torch.stack([first, other]))[0, 1])
        assert abs(correlation) < 5 / math.sqrt(n), bit
