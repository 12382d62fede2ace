"""Per-expert scale factors and the linear divisor: host-side numbers every merge path shares."""

from __future__ import annotations

RESCALE_EPS = 1e-7
_DIVISOR_EPS = 1e-8


def l1_scale(before: float, after: float) -> float:
    """mergekit's L1-norm matching of a sparsified delta: sum|delta| / sum|kept|, skipped (1.0)
    when either sum is below 1e-7."""
    if before >= RESCALE_EPS and after >= RESCALE_EPS:
        return before / after
    return 1.0


def dare_factors(
    weights: tuple[float, ...],
    densities: tuple[float, ...],
    rescale: str | None,
    l1_sums: list[tuple[float, float]] | None,
) -> list[float]:
    """Per-expert multiplier of a kept delta: weight times the rescale factor."""
    factors = []
    for i, (weight, density) in enumerate(zip(weights, densities, strict=True)):
        scale = 1.0
        if rescale == "inverse" and density < 1.0:
            scale = 1.0 / density
        elif rescale == "l1" and l1_sums is not None:
            scale = l1_scale(*l1_sums[i])
        factors.append(weight * scale)
    return factors


def linear_divisor(weights: tuple[float, ...]) -> float:
    divisor = sum(weights)
    return 1.0 if abs(divisor) < _DIVISOR_EPS else divisor
