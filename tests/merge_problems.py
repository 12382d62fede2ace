"""Random merge problems shared by the kernel tests."""

from __future__ import annotations

import torch


def draw_problem(
    shape: tuple[int, ...], k: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CPU tensors: base ~ N(0, 1), experts = base + N(0, 0.05**2), rounded to `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    experts = [base + 0.05 * torch.randn(shape, generator=generator) for _ in range(k)]
    return base.to(dtype), [e.to(dtype) for e in experts]
