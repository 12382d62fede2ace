"""Torch reference of the merges in docs/numerics.md; also the CPU path.

It computes exactly what the kernels compute, in the same order: deltas rounded to the compute
dtype, weighted deltas accumulated over experts in index order (fp32; float64 for float64 inputs),
one rounding at the end. Memory stays lean: every pass walks the tensor in chunks, so no
`[k, numel]` buffer or int64 index array exists.

Speed on a CPU comes from three choices:
- One thread (`single_threaded`): a merge is thousands of chunk-sized ops, and a multi-threaded
  op waits for its slowest thread, so one other busy process made the old two-thread path 11x
  slower; on one thread it loses nothing there. Chunks of 2**16 entries keep the buffers in L2.
- Keep decisions as integer bit masks (`x & mask` on the delta's bit pattern): comparisons and
  bool tensors are several times slower than integer arithmetic in torch on a CPU.
- Fused multiply-adds: `acc.add_(delta, alpha=factor)` is one rounding, as the kernels' `tl.fma`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .inputs import BITS_DTYPE, KEY_BITS, NONFINITE_KEY, MergeInputs, raise_for_nonfinite
from .keep_hash import ALIGN_BITS, DRAW_BITS, expert_key, keep_bits, keep_threshold
from .scales import dare_factors, l1_scale, linear_divisor
from .selection import (
    MagnitudeWindow,
    RankWindow,
    magnitude_key,
    tie_index,
    top_window,
    window_bounds,
)

CHUNK = 1 << 16
_ALIGN = 1 << ALIGN_BITS
_HALF = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on the calling thread only, restoring its thread count afterwards (torch's
    OpenMP thread count is per thread, so other threads keep theirs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- keep rules: which entries of an expert's delta survive ------------------------------------


class KeepAll:
    """Task arithmetic and density-1 experts."""

    def bits(self, index: int, start: int, delta: torch.Tensor, scratch) -> torch.Tensor | None:
        return None


@dataclass
class RandomKeep:
    """DARE: the counter-based draws of keep_hash, one key and threshold per expert.

    `check_finite`: look for NaN/Inf in every delta (a dropped one would never reach a sum),
    unless another pass (the L1 sums) has.
    """

    keys: list[int]
    thresholds: list[int]
    inputs: MergeInputs
    check_finite: bool = True

    def bits(self, index: int, start: int, delta: torch.Tensor, scratch) -> torch.Tensor | None:
        if self.check_finite:
            key = magnitude_key(delta)
            if int(key.amax()) >= NONFINITE_KEY[delta.dtype]:
                _raise_expert_nonfinite(self.inputs, index, count_nonfinite(self.inputs, index))
        if self.thresholds[index] >= 1 << DRAW_BITS:
            return None
        mask = keep_bits(
            self.keys[index],
            start,
            self.thresholds[index],
            iota=scratch.iota[: delta.numel()],
            out=scratch.draws,
            scratch=scratch.hash,
        )
        bits_dtype = BITS_DTYPE[delta.dtype]
        return mask if bits_dtype == torch.int32 else mask.to(bits_dtype)


@dataclass
class MagnitudeKeep:
    """TIES and Breadcrumbs: per expert a window of |delta| keys; of the entries tied at a bound,
    those below index `lower_cut` (lower bound) and from `upper_cut` on (upper bound) are kept."""

    windows: list[MagnitudeWindow]
    lower_cuts: list[int]
    upper_cuts: list[int]

    def bits(self, index: int, start: int, delta: torch.Tensor, scratch) -> torch.Tensor | None:
        window = self.windows[index]
        if window.keeps_all:
            return None
        key = magnitude_key(delta)
        if window.keeps_none:
            return torch.zeros_like(key)
        stop = start + key.numel()
        cuts = sorted(
            {c for c in (self.lower_cuts[index], self.upper_cuts[index]) if start < c < stop}
        )
        if not cuts:
            return self._bits(index, start, key)
        pieces, previous = [], start
        for cut in [*cuts, stop]:
            pieces.append(self._bits(index, previous, key[previous - start : cut - start]))
            previous = cut
        return torch.cat(pieces)

    def _bits(self, index: int, start: int, key: torch.Tensor) -> torch.Tensor:
        """Bits for a range on one side of each cut: the bounds are plain key comparisons."""
        window = self.windows[index]
        sign_shift = torch.iinfo(key.dtype).bits - 1
        mask = None
        if window.lower is not None:
            # key >= lowest kept key  <=>  (lowest - 1 - key) < 0: its sign bit, spread.
            lowest = window.lower.key + (start >= self.lower_cuts[index])
            mask = torch.rsub(key, lowest - 1).bitwise_right_shift_(sign_shift)
        if window.upper is not None:
            highest = window.upper.key - (start < self.upper_cuts[index])
            upper = torch.sub(key, highest + 1).bitwise_right_shift_(sign_shift)
            mask = upper if mask is None else mask.bitwise_and_(upper)
        return mask


@dataclass
class Scratch:
    """Chunk-sized buffers reused by every chunk of one merge."""

    delta: torch.Tensor
    product: torch.Tensor
    rounded: torch.Tensor
    rounded_acc: torch.Tensor
    signs: torch.Tensor
    positive_signs: torch.Tensor
    negative_signs: torch.Tensor
    draws: torch.Tensor
    hash: torch.Tensor
    iota: torch.Tensor

    @classmethod
    def for_inputs(cls, inputs: MergeInputs) -> Scratch:
        size = min(CHUNK, max(1, inputs.numel))
        dtype, acc = inputs.base.dtype, inputs.accumulator_dtype
        device = inputs.base.device

        def buffer(dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(size, dtype=dtype, device=device)

        return cls(
            delta=buffer(dtype),
            product=buffer(acc),
            rounded=buffer(dtype),
            rounded_acc=buffer(acc),
            signs=buffer(acc),
            positive_signs=buffer(acc),
            negative_signs=buffer(acc),
            draws=buffer(torch.int32),
            hash=buffer(torch.int32),
            iota=torch.arange(size, dtype=torch.int32, device=device),
        )


# --- the methods --------------------------------------------------------------------------------


def ties_merge_torch(
    inputs: MergeInputs, *, normalize: bool, lambda_: float, rescale: bool = False
) -> torch.Tensor:
    windows = [top_window(d, inputs.numel) for d in inputs.densities]
    return magnitude_merge_torch(
        inputs, windows, consensus=True, normalize=normalize, lambda_=lambda_, rescale=rescale
    )


def magnitude_merge_torch(
    inputs: MergeInputs,
    windows: Sequence[RankWindow],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    rescale: bool,
) -> torch.Tensor:
    """TIES and Breadcrumbs: keep a window of ranks of |delta| per expert, then merge."""
    keep = magnitude_keep(inputs, windows)
    factors = list(inputs.weights)
    if rescale:
        l1_sums = l1_sums_torch(inputs, keep)
        factors = [w * l1_scale(*sums) for w, sums in zip(factors, l1_sums, strict=True)]
    return weighted_merge_torch(
        inputs, factors, consensus=consensus, normalize=normalize, lambda_=lambda_, keep=keep
    )


def dare_merge_torch(
    inputs: MergeInputs,
    *,
    consensus: bool,
    normalize: bool,
    rescale: str | None,
    lambda_: float,
    seed: int,
    stream: int,
) -> torch.Tensor:
    keep = dare_keep(inputs, seed, stream)
    l1_sums = None
    if rescale == "l1":
        l1_sums = l1_sums_torch(inputs, keep)
        keep.check_finite = False  # the L1 pass has seen every delta
    factors = dare_factors(inputs.weights, inputs.densities, rescale, l1_sums)
    return weighted_merge_torch(
        inputs, factors, consensus=consensus, normalize=normalize, lambda_=lambda_, keep=keep
    )


def task_arithmetic_torch(inputs: MergeInputs, *, normalize: bool, lambda_: float) -> torch.Tensor:
    return weighted_merge_torch(
        inputs, list(inputs.weights), consensus=False, normalize=normalize, lambda_=lambda_
    )


def dare_keep(inputs: MergeInputs, seed: int, stream: int) -> RandomKeep:
    return RandomKeep(
        keys=[expert_key(seed, stream, i) for i in range(inputs.num_experts)],
        thresholds=[keep_threshold(d) for d in inputs.densities],
        inputs=inputs,
    )


def magnitude_keep(inputs: MergeInputs, windows: Sequence[RankWindow]) -> MagnitudeKeep:
    """Each expert's key bounds (radix select, which also finds non-finite deltas) and the
    indices where the ties at a bound switch from dropped to kept."""
    bounds, lower_cuts, upper_cuts = [], [], []
    for index, window in enumerate(windows):
        bound = _window_of_expert(inputs, index, window)
        bounds.append(bound)
        lower_cuts.append(inputs.numel)
        upper_cuts.append(0)
        if bound.splits_lower_ties:
            lower_cuts[-1] = 1 + tie_index(
                _key_chunks(inputs, index), bound.lower.key, bound.lower.position
            )
        if bound.splits_upper_ties:
            upper_cuts[-1] = tie_index(
                _key_chunks(inputs, index), bound.upper.key, bound.upper.position
            )
    return MagnitudeKeep(bounds, lower_cuts, upper_cuts)


def _window_of_expert(inputs: MergeInputs, index: int, window: RankWindow) -> MagnitudeWindow:
    dtype = inputs.base.dtype

    def keys() -> Iterator[torch.Tensor]:
        return _key_groups(inputs, index)

    def check_top_digit(counts: torch.Tensor, shift: int) -> None:
        _raise_expert_nonfinite(inputs, index, int(counts[NONFINITE_KEY[dtype] >> shift :].sum()))

    return window_bounds(keys, window, KEY_BITS[dtype], check_top_digit)


# --- the passes ---------------------------------------------------------------------------------


def l1_sums_torch(inputs: MergeInputs, keep) -> list[tuple[float, float]]:
    """Per expert: (sum |delta|, sum |kept delta|), the L1 norms mergekit's rescale matches,
    summed in float64 per chunk; also the non-finite check of every expert."""
    scratch = Scratch.for_inputs(inputs)
    sums = []
    for index in range(inputs.num_experts):
        before = after = 0.0
        for start, stop in chunks(inputs.numel):
            delta = _delta(inputs, index, start, stop, scratch.delta)
            magnitude = magnitude_key(delta)
            before += float(magnitude.view(delta.dtype).sum(dtype=torch.float64))
            mask = keep.bits(index, start, magnitude.view(delta.dtype), scratch)
            if mask is not None:
                magnitude.bitwise_and_(mask)
            after += float(magnitude.view(delta.dtype).sum(dtype=torch.float64))
        if not math.isfinite(before):
            _raise_expert_nonfinite(inputs, index, count_nonfinite(inputs, index))
        sums.append((before, after))
    return sums


def weighted_merge_torch(
    inputs: MergeInputs,
    factors: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    keep=None,
) -> torch.Tensor:
    """Merge the deltas scaled by `factors`, entries dropped where `keep` says: task arithmetic,
    TIES, Breadcrumbs, DARE, or the last step of a merge of prepared task vectors."""
    keep = KeepAll() if keep is None else keep
    scratch = Scratch.for_inputs(inputs)
    acc = inputs.accumulator_dtype
    factor_tables = [torch.tensor([f], dtype=acc, device=inputs.base.device) for f in factors]
    out = torch.empty_like(inputs.base)
    checker = _FiniteCheck(inputs)
    for start, stop in chunks(inputs.numel):
        if consensus:
            mixed, probe = _consensus_chunk(
                inputs, keep, factor_tables, start, stop, scratch, normalize
            )
        else:
            mixed = _linear_chunk(inputs, keep, factors, start, stop, scratch)
            if normalize:
                mixed.div_(linear_divisor(inputs.weights))
            probe = mixed
        checker.check(probe)
        if lambda_ != 1.0:
            mixed.mul_(lambda_)
        torch.add(inputs.base[start:stop], mixed, out=out[start:stop])
    return out.view(inputs.shape)


def _linear_chunk(
    inputs: MergeInputs, keep, factors: list[float], start: int, stop: int, scratch: Scratch
) -> torch.Tensor:
    mixed = torch.zeros(stop - start, dtype=inputs.accumulator_dtype, device=inputs.base.device)
    for index in range(inputs.num_experts):
        delta = _kept_delta(inputs, keep, index, start, stop, scratch)
        mixed.add_(delta, alpha=factors[index])  # a fused multiply-add, like the kernels' tl.fma
    return mixed


def _consensus_chunk(
    inputs: MergeInputs,
    keep,
    factor_tables: list[torch.Tensor],
    start: int,
    stop: int,
    scratch: Scratch,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' election, as mergekit decides it: the sign of the sum of the weighted deltas rounded
    to the compute dtype (and of that sum rounded); the agreeing experts' exact products then
    accumulate per sign, with their weights, so one pass over the experts suffices."""
    size = stop - start
    dtype, acc = inputs.base.dtype, inputs.accumulator_dtype
    device = inputs.base.device
    vote, positive, negative = (torch.zeros(size, dtype=acc, device=device) for _ in range(3))
    positive_weight = torch.zeros(size, dtype=acc, device=device) if normalize else None
    negative_weight = torch.zeros(size, dtype=acc, device=device) if normalize else None
    product = scratch.product[:size]
    signs, up, down = (
        scratch.signs[:size],
        scratch.positive_signs[:size],
        scratch.negative_signs[:size],
    )
    for index in range(inputs.num_experts):
        delta = _kept_delta(inputs, keep, index, start, stop, scratch)
        torch.mul(delta, factor_tables[index], out=product)
        rounded = _rounded(product, dtype, scratch)
        vote.add_(rounded)
        torch.sign(rounded, out=signs)
        torch.clamp(signs, min=0, out=up)
        torch.clamp(signs, max=0, out=down)
        positive.addcmul_(product, up)
        negative.addcmul_(product, down, value=-1)
        if normalize:
            weight = inputs.weights[index]
            positive_weight.add_(up, alpha=weight)
            negative_weight.add_(down, alpha=-weight)
    elected = _elected_bits(vote, dtype)
    mixed = _select(elected, positive, negative)
    if normalize:
        divisor = _select(elected, positive_weight, negative_weight)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed, vote


def _elected_bits(vote: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """-1 where the vote, rounded to the compute dtype, is >= 0 (a zero sum elects +), else 0,
    as integers of the accumulator's width (torch.where is slow on the CPU)."""
    rounded = vote.to(dtype) if dtype in _HALF else vote.clone()
    rounded.add_(0.0)  # -0.0 becomes +0.0: it elects + like any zero
    bits = rounded.view(BITS_DTYPE[rounded.dtype])
    sign = bits.bitwise_right_shift_(torch.iinfo(bits.dtype).bits - 1).bitwise_not_()
    return sign.to(BITS_DTYPE[vote.dtype])


def _select(bits: torch.Tensor, if_set: torch.Tensor, if_clear: torch.Tensor) -> torch.Tensor:
    """Entries of `if_set` where `bits` is -1, of `if_clear` where it is 0 (a new tensor)."""
    set_bits = if_set.view(bits.dtype) & bits
    return set_bits.bitwise_or_(if_clear.view(bits.dtype) & ~bits).view(if_set.dtype)


def _rounded(product: torch.Tensor, dtype: torch.dtype, scratch: Scratch) -> torch.Tensor:
    """The product as mergekit holds it: rounded to the compute dtype (exact for fp32 and fp64)."""
    if dtype not in _HALF:
        return product
    size = product.numel()
    return scratch.rounded_acc[:size].copy_(scratch.rounded[:size].copy_(product))


def _kept_delta(
    inputs: MergeInputs, keep, index: int, start: int, stop: int, scratch: Scratch
) -> torch.Tensor:
    """Expert `index`'s delta on [start, stop) with its dropped entries zeroed."""
    delta = _delta(inputs, index, start, stop, scratch.delta)
    if isinstance(keep, KeepAll):
        return delta
    mask = keep.bits(index, start, delta, scratch)
    if mask is not None:
        delta.view(BITS_DTYPE[delta.dtype]).bitwise_and_(mask)
    return delta


def _delta(
    inputs: MergeInputs, index: int, start: int, stop: int, buffer: torch.Tensor
) -> torch.Tensor:
    """Expert minus base in the compute dtype, as mergekit forms it (no upcast), in `buffer`."""
    out = buffer[: stop - start]
    if inputs.task_vectors:
        return out.copy_(inputs.experts[index][start:stop])
    return torch.sub(inputs.experts[index][start:stop], inputs.base[start:stop], out=out)


def _key_groups(inputs: MergeInputs, index: int, per_group: int = 8) -> Iterator[torch.Tensor]:
    """Expert `index`'s |delta| keys, about `per_group` chunks at a time (fewer, larger
    histograms); the yielded buffer is reused."""
    device, dtype = inputs.base.device, inputs.base.dtype
    delta = torch.empty(min(CHUNK, inputs.numel), dtype=dtype, device=device)
    group = torch.empty(
        min(CHUNK * per_group, inputs.numel), dtype=BITS_DTYPE[dtype], device=device
    )
    mask = torch.iinfo(group.dtype).max
    filled = 0
    for start, stop in chunks(inputs.numel):
        if filled + stop - start > group.numel():
            yield group[:filled]
            filled = 0
        bits = _delta(inputs, index, start, stop, delta).view(group.dtype)
        torch.bitwise_and(bits, mask, out=group[filled : filled + stop - start])
        filled += stop - start
    if filled:
        yield group[:filled]


def _key_chunks(inputs: MergeInputs, index: int) -> Iterator[tuple[int, torch.Tensor]]:
    buffer = torch.empty(
        min(CHUNK, inputs.numel), dtype=inputs.base.dtype, device=inputs.base.device
    )
    for start, stop in chunks(inputs.numel):
        yield start, magnitude_key(_delta(inputs, index, start, stop, buffer))


# --- non-finite deltas --------------------------------------------------------------------------


class _FiniteCheck:
    """NaN and Inf in a delta reach the accumulators of a merge pass; a chunk whose sums are not
    finite makes the experts' deltas be counted (once), which raises naming the first bad one.
    (Sums can also overflow from finite deltas: then nothing is raised, as in the kernels.)"""

    def __init__(self, inputs: MergeInputs) -> None:
        self.inputs = inputs
        self.counted = False

    def check(self, sums: torch.Tensor) -> None:
        # One reduction per chunk: NaN and Inf propagate into the total.
        if self.counted or math.isfinite(float(sums.sum())):
            return
        self.counted = True
        inputs = self.inputs
        raise_for_nonfinite(
            inputs.base, [count_nonfinite(inputs, i) for i in range(inputs.num_experts)]
        )


def count_nonfinite(inputs: MergeInputs, index: int) -> int:
    """NaN and Inf among expert `index`'s deltas."""
    limit = NONFINITE_KEY[inputs.base.dtype]
    return sum(int((key >= limit).sum()) for _, key in _key_chunks(inputs, index))


def _raise_expert_nonfinite(inputs: MergeInputs, index: int, count: int) -> None:
    if count:
        counts = [0] * inputs.num_experts
        counts[index] = count
        raise_for_nonfinite(inputs.base, counts)


def chunks(numel: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of at most CHUNK entries, never across a multiple of 2**16 (a DARE
    draw needs its block's constant, keep_hash.keep_bits)."""
    start = 0
    while start < numel:
        stop = min(start + CHUNK, (start | _ALIGN - 1) + 1, numel)
        yield start, stop
        start = stop
