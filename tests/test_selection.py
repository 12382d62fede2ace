"""The exact-k magnitude trim of TIES (numerics.md, "Exactly k kept per expert").

Each expert keeps exactly `max(1, int(density * numel))` entries of largest |delta| (all of them
at density 1), and among entries whose |delta| equals the threshold the lowest indices win.
Kept sets are observed through the public `ties_merge` with one expert of weight 1: the deltas
are small integers on an integer base, so `base + delta` is exact in every dtype and an entry is
kept exactly when the output differs from the base.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_ops import reference, ties_merge
from triton_ops.merge_pass import BLOCK
from triton_ops.selection import Bound, magnitude_key, radix_select

BACKENDS = ("torch", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def spec_kept_count(density: float, numel: int) -> int:
    """numerics.md's count, written out independently of the package's helper."""
    return numel if density >= 1.0 else max(1, int(density * numel))


def brute_force_top_k(magnitudes: list[float], k: int) -> list[bool]:
    """The k largest magnitudes, ties broken by lowest index: a stable sort by (-|x|, index)."""
    order = sorted(range(len(magnitudes)), key=lambda i: (-magnitudes[i], i))
    kept = [False] * len(magnitudes)
    for i in order[:k]:
        kept[i] = True
    return kept


def magnitude_threshold(keys: torch.Tensor, k: int, key_bits: int) -> Bound:
    """The bound of a top-k trim: the entry of rank k - 1."""
    (bound,) = radix_select(lambda: iter((keys,)), [k - 1], key_bits)
    return bound


def kept_by_threshold(keys: torch.Tensor, threshold: Bound) -> torch.Tensor:
    """What a lower `Bound` means: keys above it, plus its ties up to its position."""
    keys = keys.long()
    tied = keys == threshold.key
    tie_rank = torch.cumsum(tied.long(), 0) - tied.long()
    return (keys > threshold.key) | (tied & (tie_rank <= threshold.position))


def integer_problem(
    deltas: torch.Tensor, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """An integer base in [-64, 64] and base + deltas: exact in fp32, bf16 and fp16."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 65, deltas.shape, generator=generator).to(dtype)
    return base, (base.float() + deltas.float()).to(dtype)


def kept_by_ties_merge(
    base: torch.Tensor, expert: torch.Tensor, density: float, backend: str
) -> torch.Tensor:
    merged = ties_merge(
        base, [expert], weights=[1.0], densities=[density], normalize=False, backend=backend
    )
    assert merged.dtype == base.dtype and merged.shape == base.shape
    kept = merged != base
    # Kept entries carry the expert's value, dropped ones the base's: nothing in between.
    assert torch.equal(merged[kept], expert[kept])
    return kept


def nonzero_integer_deltas(numel: int, largest: int, seed: int) -> torch.Tensor:
    """Deltas in ±{1..largest}: no zeros (every kept entry is visible), many ties."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(1, largest + 1, (numel,), generator=generator)
    sign = torch.randint(0, 2, (numel,), generator=generator) * 2 - 1
    return (magnitude * sign).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("numel", "density"),
    [(100, 0.29), (100, 0.5), (1001, 0.1), (1001, 0.999), (777, 1e-9), (1, 0.3), (4099, 0.013)],
)
def test_trim_keeps_exactly_max_1_int_density_times_numel(
    numel: int, density: float, dtype: torch.dtype, backend: str
) -> None:
    deltas = nonzero_integer_deltas(numel, largest=5, seed=numel)
    base, expert = integer_problem(deltas, dtype)
    kept = kept_by_ties_merge(base, expert, density, backend)
    assert int(kept.sum()) == spec_kept_count(density, numel)


def test_int_truncates_the_kept_count_like_mergekit() -> None:
    # 0.29 * 100 is 28.999999999999996 in binary floating point: mergekit keeps 28, not 29.
    assert spec_kept_count(0.29, 100) == 28
    base, expert = integer_problem(nonzero_integer_deltas(100, largest=50, seed=1), torch.float32)
    assert int(kept_by_ties_merge(base, expert, 0.29, "torch").sum()) == 28


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_ties_are_kept_lowest_index_first(dtype: torch.dtype, backend: str) -> None:
    deltas = torch.tensor([1.0, -3.0, 2.0, 3.0, -3.0, 1.0, 3.0, -2.0, 3.0, 4.0])
    base, expert = integer_problem(deltas, dtype)
    # k = 4: the 4 is kept, then three of the five entries with |delta| = 3, lowest index first.
    kept = kept_by_ties_merge(base, expert, 0.4, backend)
    expected = torch.tensor([False, True, False, True, True, False, False, False, False, True])
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_breaking_across_several_kernel_blocks(backend: str) -> None:
    # |delta| in {1, 2}, so the threshold sits inside a tie group spread over four blocks (and the
    # torch path's chunks): the rank of a tie must count the ties of every earlier block.
    numel = 3 * BLOCK + 517
    generator = torch.Generator().manual_seed(7)
    deltas = torch.where(torch.rand(numel, generator=generator) < 0.1, 2.0, -1.0)
    base, expert = integer_problem(deltas, torch.bfloat16)
    density = 0.7
    k = spec_kept_count(density, numel)
    assert int((deltas.abs() == 2).sum()) < k, "the threshold must fall among the |delta| = 1 ties"
    kept = kept_by_ties_merge(base, expert, density, backend)
    expected = torch.tensor(brute_force_top_k(deltas.abs().tolist(), k))
    assert torch.equal(kept, expected)
    # The kept ties are a prefix of the tie group: they end in the last block, not the first.
    last_kept_tie = int(torch.nonzero(kept & (deltas.abs() == 1)).max())
    assert last_kept_tie >= 2 * BLOCK


@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 18])
def test_torch_path_tie_breaking_does_not_depend_on_its_chunk_size(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The torch path streams in chunks of reference.CHUNK: the histograms and the tie ranks
    # must carry over from one chunk to the next.
    monkeypatch.setattr(reference, "CHUNK", chunk)
    numel = 10_007
    deltas = nonzero_integer_deltas(numel, largest=3, seed=8)
    base, expert = integer_problem(deltas, torch.float16)
    for density in (0.1, 0.5, 0.9):
        kept = kept_by_ties_merge(base, expert, density, "torch")
        expected = brute_force_top_k(deltas.abs().tolist(), spec_kept_count(density, numel))
        assert kept.tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_density_one_keeps_every_entry(dtype: torch.dtype, backend: str) -> None:
    deltas = nonzero_integer_deltas(3001, largest=3, seed=3)
    base, expert = integer_problem(deltas, dtype)
    merged = ties_merge(
        base, [expert], weights=[1.0], densities=[1.0], normalize=False, backend=backend
    )
    assert torch.equal(merged, expert)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trim_is_per_expert_not_global(backend: str) -> None:
    # Expert 1's deltas are all larger than expert 0's; a global trim would drop expert 0 entirely.
    small = nonzero_integer_deltas(500, largest=3, seed=4)
    base, expert0 = integer_problem(small, torch.float32)
    expert1 = base + 100 * torch.sign(small)  # same signs: consensus keeps both experts' entries
    merged = ties_merge(
        base,
        [expert0, expert1],
        weights=[1.0, 1.0],
        densities=[0.2, 0.2],
        normalize=False,
        backend=backend,
    )
    expert0_kept = torch.tensor(brute_force_top_k(small.abs().tolist(), 100))
    expert1_kept = torch.arange(500) < 100  # all |delta| = 100 tie: the first 100 are kept
    expected = (
        base
        + torch.where(expert0_kept, small, 0.0)
        + torch.where(expert1_kept, 100 * torch.sign(small), 0.0)
    )
    assert torch.equal(merged, expected)


# --- the selection primitive: radix select on |delta|'s bit pattern ---------------------------


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    pool=st.lists(st.integers(0, 2**15 - 1), min_size=1, max_size=6, unique=True),
    numel=st.integers(1, 300),
)
def test_magnitude_threshold_matches_a_stable_sort_on_16_bit_keys(
    data: st.DataObject, pool: list[int], numel: int
) -> None:
    # Keys drawn from a small pool: most keys are duplicates of each other.
    values = data.draw(st.lists(st.sampled_from(pool), min_size=numel, max_size=numel))
    k = data.draw(st.integers(1, numel))
    keys = torch.tensor(values, dtype=torch.int16)
    threshold = magnitude_threshold(keys, k, 15)
    assert threshold.ties == values.count(threshold.key)
    assert 0 <= threshold.position < threshold.ties
    kept = kept_by_threshold(keys, threshold)
    assert kept.tolist() == brute_force_top_k([float(v) for v in values], k)


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    pool=st.lists(
        st.one_of(st.integers(0, 2**31 - 1), st.integers(0, 2**16), st.just(2**16 + 5)),
        min_size=1,
        max_size=8,
        unique=True,
    ),
    numel=st.integers(1, 200),
)
def test_magnitude_threshold_matches_a_stable_sort_on_31_bit_keys(
    data: st.DataObject, pool: list[int], numel: int
) -> None:
    # 31-bit keys take two 16-bit digits: values sharing or differing only in the low digit.
    values = data.draw(st.lists(st.sampled_from(pool), min_size=numel, max_size=numel))
    k = data.draw(st.integers(1, numel))
    keys = torch.tensor(values, dtype=torch.int32)
    threshold = magnitude_threshold(keys, k, 31)
    assert threshold.ties == values.count(threshold.key)
    kept = kept_by_threshold(keys, threshold)
    assert kept.tolist() == brute_force_top_k([float(v) for v in values], k)


FLOAT_POOLS = {
    # Nonzero magnitudes incl. subnormals, neighbours one ulp apart and equal values of both signs.
    torch.float32: [1.0, -1.0, 1.0000001, 3e-38, 1e-45, -2e-40, 65504.0, 0.5, -0.5, 1e30],
    torch.bfloat16: [1.0, -1.0, 1.0078125, 1e-39, -9.2e-41, 0.5, -0.5, 3.0e38, 2.0, -2.0],
    torch.float16: [1.0, -1.0, 1.0009765625, 6e-8, -1.2e-7, 6.1e-5, 0.5, -0.5, 65504.0, 2.0],
    torch.float64: [1.0, -1.0, 1.0 + 2**-52, 1e-300, 5e-324, -2e-310, 1e300, 0.5, -0.5, 2.0],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=60, deadline=None)
@given(data=st.data(), numel=st.integers(1, 120))
def test_ties_merge_keeps_the_top_k_magnitudes_lowest_index_first(
    dtype: torch.dtype, data: st.DataObject, numel: int
) -> None:
    # Compared on the float magnitudes themselves, not on bit patterns: this checks that the
    # integer order of |delta|'s bits is the numeric order (subnormals included).
    values = data.draw(
        st.lists(st.sampled_from(FLOAT_POOLS[dtype]), min_size=numel, max_size=numel)
    )
    density = data.draw(st.floats(1e-6, 1.0))
    expert = torch.tensor(values, dtype=torch.float64).to(dtype)
    base = torch.zeros_like(expert)
    kept = kept_by_ties_merge(base, expert, density, "torch")
    magnitudes = expert.double().abs().tolist()
    assert kept.tolist() == brute_force_top_k(magnitudes, spec_kept_count(density, numel))


def test_magnitude_key_orders_like_the_absolute_value() -> None:
    values = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 1.0, -1.5, 3e38, -float("inf")])
    keys = magnitude_key(values)
    assert keys.dtype == torch.int32
    assert np.array_equal(
        np.argsort(keys.numpy(), kind="stable"), np.argsort(values.abs().numpy(), kind="stable")
    )
    assert int(keys[0]) == int(keys[1]) == 0  # -0.0 and 0.0 are the same magnitude
    assert int(keys[2]) == int(keys[3])


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    pool=st.lists(st.integers(0, 2**15 - 1), min_size=1, max_size=6, unique=True),
    numel=st.integers(1, 200),
)
def test_two_ranks_in_one_select_are_those_of_a_stable_sort(
    data: st.DataObject, pool: list[int], numel: int
) -> None:
    # Breadcrumbs selects two ranks per expert in the same passes: each must be the entry a
    # stable sort by (-key, index) puts there, with its position among its ties.
    values = data.draw(st.lists(st.sampled_from(pool), min_size=numel, max_size=numel))
    ranks = sorted(data.draw(st.lists(st.integers(0, numel - 1), min_size=2, max_size=2)))
    order = sorted(range(numel), key=lambda i: (-values[i], i))
    bounds = radix_select(lambda: iter((torch.tensor(values, dtype=torch.int16),)), ranks, 15)
    for rank, bound in zip(ranks, bounds, strict=True):
        entry = order[rank]
        assert bound.key == values[entry]
        assert bound.position == sum(values[i] == bound.key for i in range(entry))
        assert bound.ties == values.count(bound.key)


def test_magnitude_key_of_float64_orders_like_the_absolute_value() -> None:
    values = torch.tensor([0.0, -0.0, 5e-324, 1e-300, 1.0, -1.5, 1e300, -float("inf")])
    keys = magnitude_key(values.double())
    assert keys.dtype == torch.int64
    assert keys.tolist() == sorted(keys.tolist())
    assert int(keys[0]) == int(keys[1]) == 0
