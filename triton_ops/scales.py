"""Per-expert scale factors and the linear divisor: host-side numbers every merge path shares."""

from __future__ import annotations

_RESCALE_EPS = 1e-7
_DIVISOR_EPS = 1e-8


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
            before, after = l1_sums[i]
            if before >= _RESCALE_EPS and after >= _RESCALE_EPS:
                scale = before / after
        factors.append(weight * scale)
    return factors


def linear_divisor(weights: tuple[float, ...]) -> float:
    divisor = sum(weights)
    return 1.0 if abs(divisor) < _DIVISOR_EPS else divisor
