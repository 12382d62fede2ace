"""What a fit can tell about itself: parameters a bound decided, forecasts of held-out cells, and
whether the cells scatter around the curve as much as sampling explains.

- A parameter within a tolerance of a bound was decided by the bound, not the data (``b`` on its
  cap of 5, ``gamma`` on 0); every answer that rests on it inherits that (docs/law.md section 4).
- Leave-one-k-out: refit without the largest k and forecast it, the check a user extrapolating in
  k needs. Leave-one-size-out (laws in N): refit without the largest size and forecast its cells.
- Lack of fit: the weighted residuals of sampled cells against the variance the cells' sampling
  explains, a chi-square test (cells holding every subset of their pool have no sampling error
  and are left out).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from math import comb
from typing import Any

import numpy as np
from scipy.stats import chi2

from .laws import Law

_BOUND_TOLERANCE = 1e-6
# Which parameters each planning answer reads, through the law's tail (L_inf, A, b).
TAIL_DEPENDS = {
    "joint": {"L_inf": ("L_star", "B", "beta"), "A": ("A0", "gamma"), "b": ("b",)},
    "per-size": {"L_inf": ("L_inf",), "A": ("A",), "b": ("b",)},
}


def pinned(law: Law, theta: np.ndarray) -> dict[str, str]:
    """Parameters within a tolerance of a finite bound: name -> "lower" or "upper"."""
    out = {}
    for p, value in zip(law.params, theta, strict=True):
        for side, bound in (("lower", p.lower), ("upper", p.upper)):
            if np.isfinite(bound) and abs(value - bound) <= _BOUND_TOLERANCE * max(1, abs(bound)):
                out[p.name] = side
    return out


def bound_warnings(law: Law, theta: np.ndarray, group: Mapping[str, Any]) -> list[str]:
    values = dict(zip(law.param_names, theta, strict=True))
    bounds = {p.name: (p.lower, p.upper) for p in law.params}
    warnings = []
    for name, side in pinned(law, theta).items():
        bound = bounds[name][0 if side == "lower" else 1]
        warnings.append(
            f"{name} = {values[name]:.4g} sits on its {side} bound ({bound:g}): the bound, not "
            "the data, decided it; answers that rest on it are flagged"
        )
        if name == "b" and side == "upper" and "ties" in str(group.get("method", "")).lower():
            warnings.append(
                "b on its cap on a TIES curve: the paper adds a bounded term D k/(k+q) for TIES "
                "at lambda 1; try --form ties-per-size"
            )
    return warnings


def answer_warnings(
    law: Law, pinned_names: Mapping[str, str], answers: Mapping[str, tuple[str, ...]]
) -> list[str]:
    """For each planning answer that reads a pinned parameter, one line saying so."""
    depends = TAIL_DEPENDS.get(law.name)
    if depends is None or not pinned_names:
        return []
    out = []
    for answer, tail_parts in answers.items():
        names = sorted({p for part in tail_parts for p in depends[part]} & set(pinned_names))
        if names:
            out.append(
                f"{answer} rests on {', '.join(names)}, which sat on a bound in the fit: read it "
                "as decided by the bound"
            )
    return out


@dataclass(frozen=True)
class Forecast:
    """A refit without some cells, scored on them."""

    held_out: str  # "k=9" or "N=72"
    cells: int
    max_rel_error: float
    rms_error: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forecast(
    held_out: str,
    mask: np.ndarray,
    observed: np.ndarray,
    refit: Callable[[np.ndarray], np.ndarray | None],
) -> Forecast | None:
    """Refit on ``~mask`` (``refit`` returns the predictions at every cell, None if it cannot
    fit) and score the predictions where ``mask`` holds."""
    predicted = refit(~mask)
    if predicted is None:
        return None
    error = predicted[mask] - observed[mask]
    with np.errstate(divide="ignore", invalid="ignore"):  # a variance cell may be exactly 0
        relative = np.abs(error / observed[mask])
    return Forecast(
        held_out=held_out,
        cells=int(mask.sum()),
        max_rel_error=float(np.max(relative)),
        rms_error=float(np.sqrt(np.mean(error**2))),
    )


@dataclass(frozen=True)
class LackOfFit:
    """Chi-square of the sampled cells' residuals against their sampling variance."""

    chi2: float
    dof: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lack_of_fit(
    residuals: np.ndarray,
    single_merge_var: np.ndarray,
    n: np.ndarray,
    k: np.ndarray,
    pool_size: int | None,
    n_params: int,
) -> LackOfFit | None:
    """Residual cell means against the variance their sampling explains (finite population
    corrected when the pool is known); None when fewer sampled cells than parameters + 1."""
    total = (
        np.array([comb(pool_size, int(kk)) for kk in k], dtype=float)
        if pool_size is not None
        else np.full(k.shape, np.inf)
    )
    sampled = (n < total) & (n >= 1) & np.isfinite(single_merge_var) & (single_merge_var > 0)
    var_of_mean = single_merge_var / n * (1 - n / total)
    dof = int(sampled.sum()) - n_params
    if dof < 1:
        return None
    statistic = float(np.sum(residuals[sampled] ** 2 / var_of_mean[sampled]))
    return LackOfFit(statistic, dof, float(chi2.sf(statistic, dof)))
