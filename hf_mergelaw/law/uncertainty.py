"""Normal quantiles and parameter Jacobians for Wald (delta-method) intervals."""

from __future__ import annotations

from collections.abc import Mapping
from statistics import NormalDist

import numpy as np

from ..errors import LawError
from .laws import Law


def z_value(level: float) -> float:
    """Two-sided normal quantile for a central interval of probability ``level``."""
    if not 0 < level < 1:
        raise LawError(f"interval level must lie in (0, 1), got {level}")
    return NormalDist().inv_cdf((1 + level) / 2)


def numeric_or_exact_jacobian(
    law: Law, theta: np.ndarray, x: Mapping[str, np.ndarray]
) -> np.ndarray:
    """d f / d theta at the points ``x``: the law's own Jacobian, else forward/backward differences
    that stay inside the bounds."""
    if law.jac is not None:
        with np.errstate(all="ignore"):
            return np.asarray(law.jac(theta, x), dtype=float)
    base = law.evaluate(theta, x)
    cols = []
    for j, upper in enumerate(law.upper):
        # Step forward unless that crosses the upper bound; a backward step from a value at its
        # upper bound stays feasible because lower < upper.
        step = 1e-6 * max(1.0, abs(theta[j]))
        if theta[j] + step > upper:
            step = -step
        shifted = theta.copy()
        shifted[j] += step
        cols.append((law.evaluate(shifted, x) - base) / step)
    return np.column_stack(cols)
