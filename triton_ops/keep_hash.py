"""Counter-based DARE randomness shared by the Triton kernels and the torch path.

An entry's keep decision is a pure function of (seed, stream, expert index, element index i):

    draw(i) = mix32(low32(i) ^ word_key(expert_key(seed, stream, expert), i >> 32))
    kept   <=>  (draw(i) & (2**31 - 1))  <  keep_threshold(density)

`mix32` is Chris Wellons' "lowbias32" integer hash: two multiply-xorshift rounds, a bijection of
32-bit words with near-ideal avalanche. `word_key` hashes the expert's 64-bit key (splitmix64 of the
seed, the stream and the expert index) with the index's 2**32-element word, so a tensor of more
than 2**32 entries never repeats a mask. That is about a dozen 32-bit integer operations per
entry: cheap in torch on a CPU (Philox4x32-10, used before, cost more than the rest of a DARE
merge there) and in the kernels. Its statistical checks (kept fractions, independence between
experts, seeds, streams and neighbouring entries, uniform draws) are in tests/test_dare.py.
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
WORD_BITS = 32
# lowbias32's multipliers; the second one as the int32 torch multiplies by (same bits).
MIX_A = 0x7FEB352D
MIX_B = 0x846CA68B
_MIX_B_INT32 = MIX_B - (1 << 32)
# Draws keep 31 bits so that `draw - threshold` fits an int32: the sign of the difference is the
# keep decision, with no comparison (bool tensors are slow on the CPU).
DRAW_BITS = 31
DRAW_MASK = (1 << DRAW_BITS) - 1
# The torch path's ranges are aligned to this: within one, mix32's first xorshift is a constant.
ALIGN_BITS = 16


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def expert_key(seed: int, stream: int, expert_index: int) -> int:
    """The 64-bit key of one expert's masks in one tensor."""
    x = _splitmix64(seed)
    x = _splitmix64(x ^ stream)
    return _splitmix64(x ^ expert_index)


def word_key(key: int, word: int) -> int:
    """The 32-bit key of the entries `word * 2**32 .. (word + 1) * 2**32 - 1`."""
    return _splitmix64(key ^ word) & _MASK32


def word_keys(key: int, numel: int) -> list[int]:
    """The word keys of a tensor of `numel` entries, as int32 bit patterns (what kernels load)."""
    words = max(1, -(-numel >> WORD_BITS))
    return [_as_int32(word_key(key, word)) for word in range(words)]


def tensor_stream(name: str) -> int:
    """The stream of a named tensor (e.g. "model.layers.0.mlp.up_proj.weight"): a stable 63-bit
    hash, never Python's salted `hash`, so masks do not depend on process or tensor order."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keep_threshold(density: float) -> int:
    """A 31-bit draw below this keeps the entry: P(keep) = density to within 2**-31."""
    return min(1 << DRAW_BITS, round(density * (1 << DRAW_BITS)))


def draw(key: int, index: int) -> int:
    """The 31-bit draw of one entry: the definition the torch path and kernels are tested on."""
    return mix32((index & _MASK32) ^ word_key(key, index >> WORD_BITS)) & DRAW_MASK


def mix32(value: int) -> int:
    """lowbias32 of one 32-bit word."""
    value ^= value >> 16
    value = (value * MIX_A) & _MASK32
    value ^= value >> 15
    value = (value * MIX_B) & _MASK32
    return value ^ (value >> 16)


def keep_bits(
    key: int,
    start: int,
    threshold: int,
    *,
    iota: torch.Tensor,
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """-1 (all bits set) where entries start .. start+n-1 are kept, 0 where dropped, as int32;
    n = iota.numel() (iota holds 0 .. n-1 as int32).

    The range must lie in one 2**16-aligned block; `out` and `scratch` are int32 buffers of n
    entries (the hash runs in place). A threshold of 2**31 keeps everything: the caller's to skip.
    """
    count = iota.numel()
    if start >> ALIGN_BITS != (start + count - 1) >> ALIGN_BITS:
        raise ValueError(f"entries {start}..{start + count - 1} straddle a 2**16 boundary")
    x, tmp = out[:count], scratch[:count]
    # In a 2**16-aligned block, low32(index) ^ key = u ^ o with u constant and o < 2**16 the
    # index within the block: mix32's first xorshift gives o ^ (u ^ (u >>> 16)), a constant xor.
    u = (start & _MASK32 & ~((1 << ALIGN_BITS) - 1)) ^ word_key(key, start >> WORD_BITS)
    torch.add(iota, start & ((1 << ALIGN_BITS) - 1), out=x)
    x.bitwise_xor_(_as_int32(u ^ (u >> 16)))
    x.mul_(MIX_A)
    _xorshift_(x, tmp, 15)
    x.mul_(_MIX_B_INT32)
    _xorshift_(x, tmp, 16)
    # (draw & (2**31 - 1)) - threshold < 0 exactly when kept; its sign bit, spread, is the mask.
    x.bitwise_and_(DRAW_MASK).sub_(threshold)
    return x.bitwise_right_shift_(DRAW_BITS)


def _xorshift_(x: torch.Tensor, tmp: torch.Tensor, shift: int) -> None:
    """x ^= x >>> shift on int32 (torch's >> is arithmetic; the mask makes it logical)."""
    torch.bitwise_right_shift(x, shift, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_((1 << (32 - shift)) - 1))


def _as_int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value
