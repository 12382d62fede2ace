"""Counter-based DARE randomness shared by the Triton kernels and the torch path.

An entry's keep decision is a pure function of (seed, stream, expert index, element index):
`philox_uniform32(expert_key(seed, stream, i), ...)[element] < keep_threshold(density)`. One
Philox4x32-10 call (counter (c, 0, 0) with c = element // 4 split into two 32-bit words, key =
the expert key's two words) yields the four 32-bit draws of elements 4c .. 4c+3: a quarter of the
integer work of one call per element, which keeps DARE memory-bound on a GPU. The kernels call
`tl.randint4x`; `philox_uniform32` reproduces it bit for bit, so every backend, block size and
tensor order keeps the same entries.
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def expert_key(seed: int, stream: int, expert_index: int) -> int:
    """Philox key of one expert's stream; below 2**63 so kernels receive it as int64."""
    x = _splitmix64(seed)
    x = _splitmix64(x ^ stream)
    x = _splitmix64(x ^ expert_index)
    return x >> 1


def tensor_stream(name: str) -> int:
    """The stream of a named tensor (e.g. "model.layers.0.mlp.up_proj.weight"): a stable 63-bit
    hash, never Python's salted `hash`, so masks do not depend on process or tensor order."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keep_threshold(density: float) -> int:
    """A uniform 32-bit draw below this keeps the entry: P(keep) = density to within 2**-32."""
    return min(1 << 32, round(density * (1 << 32)))


def philox_uniform32(
    key: int, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The 32-bit draws of elements start .. start+count-1 (start a multiple of 4), as int64.

    Arithmetic runs in int64: a 32x32-bit product wraps modulo 2**64, which keeps its low and
    high words exact.
    """
    if start % 4:
        raise ValueError(f"start={start} must be a multiple of 4 (four draws per Philox call)")
    counter = torch.arange(start // 4, (start + count + 3) // 4, dtype=torch.int64, device=device)
    c0, c1 = counter & _MASK32, counter >> 32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    product_a, product_b = torch.empty_like(c0), torch.empty_like(c0)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(_ROUNDS):
        torch.mul(c2, _ROUND_B, out=product_b)
        torch.mul(c0, _ROUND_A, out=product_a)
        c0 = (product_b >> 32).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (product_a >> 32).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = product_b & _MASK32, product_a & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=1).reshape(-1)[:count]
