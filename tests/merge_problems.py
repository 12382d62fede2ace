"""Random merge problems shared by the kernel tests."""

from __future__ import annotations

from typing import Literal

import torch

Deltas = Literal["gaussian", "quantized", "sparse"]


def draw_problem(
    shape: tuple[int, ...], k: int, dtype: torch.dtype, seed: int, deltas: Deltas = "gaussian"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CPU tensors of `dtype`: a base and k experts, each the base plus a delta of the kind asked.

    "gaussian": base ~ N(0, 1), deltas ~ N(0, 0.05**2). "quantized": multiples of 1/8 (exact in
    every dtype) with |delta| taking four values, so every threshold splits a large group of ties.
    "sparse": gaussian deltas with ~90% of every delta exactly zero.
    """
    generator = torch.Generator().manual_seed(seed)
    if deltas == "quantized":
        base = torch.randint(-64, 65, shape, generator=generator) / 8
        steps = [torch.randint(-3, 4, shape, generator=generator) / 8 for _ in range(k)]
    else:
        base = torch.randn(shape, generator=generator)
        steps = [0.05 * torch.randn(shape, generator=generator) for _ in range(k)]
        if deltas == "sparse":
            steps = [
                torch.where(torch.rand(shape, generator=generator) < 0.1, d, 0.0) for d in steps
            ]
    base = base.to(dtype)
    return base, [(base.float() + d).to(dtype) for d in steps]
