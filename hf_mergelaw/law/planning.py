"""Planning with a fitted law (``docs/law.md`` section 5).

Closed forms on the per-size view ``L(k) = L_inf + A / (k + b)`` (for the joint law
``L_inf = L_star + B N^-beta`` and ``A = A0 N^-gamma`` at the chosen N). They are vectorised:
arrays in, float arrays out, ``inf`` where no k exists, so they apply unchanged to bootstrap draws.

    >>> int(k_for_target(0.20, 0.06, 0.0, 0.215))     # 0.06 / 0.015 = 4 experts
    4
    >>> int(k_stop(0.06, 0.0, 0.002))   # at k=5 the next gain, 0.06/(5*6), is 0.002: not below
    6

:func:`plan` evaluates all of them for a :class:`FitResult` with intervals from its bootstrap
(or Wald draws); :func:`three_point_recipe` forecasts from k in {1, 2, 4};
:func:`size_vs_experts` compares base sizes against expert counts under a :class:`CostModel`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import PlanningError
from ..files import json_float
from .diagnostics import answer_warnings
from .fit_result import FitResult
from .paper import MERGE_SECONDS_9, PAPER_SIZES
from .records import at_size

# Below this R^2 a plan warns that the law does not describe the records.
POOR_FIT_R2 = 0.5
# Guards ceil/floor against values like 4.000000000001 produced by rounding in A / gap.
_EPS = 1e-9

_METHOD_ALIASES = {"ta": "task_arithmetic", "task-arithmetic": "task_arithmetic", "avg": "average"}


def k_for_target(L_inf: Any, A: Any, b: Any, target: float) -> np.ndarray:
    """Smallest k >= 1 with ``L_inf + A/(k+b) <= target``: ``ceil(A/(T - L_inf) - b)``; inf when
    ``target <= L_inf`` (the floor can never be beaten by adding experts)."""
    gap = target - np.asarray(L_inf, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.ceil(np.asarray(A) / gap - b - _EPS)
    return np.where(gap > 0, np.maximum(k, 1.0), np.inf)


def k_eps(A: Any, b: Any, eps: float) -> np.ndarray:
    """Smallest k >= 1 within ``eps`` of the floor: ``ceil(A/eps - b)``."""
    if not eps > 0:
        raise PlanningError(f"eps must be positive, got {eps}")
    return np.maximum(np.ceil(np.asarray(A, dtype=float) / eps - b - _EPS), 1.0)


def marginal_gain(k: Any, A: Any, b: Any) -> np.ndarray:
    """Loss drop from adding the (k+1)-th expert: ``A / ((k+b)(k+1+b))``."""
    k = np.asarray(k, dtype=float)
    return np.asarray(A) / ((k + b) * (k + 1 + b))


def k_stop(A: Any, b: Any, tau: float) -> np.ndarray:
    """Smallest k >= 1 whose next expert gains less than ``tau``.

    ``marginal_gain(k) < tau`` iff ``k > sqrt(A/tau + 1/4) - b - 1/2``; docs/law.md writes the
    ceil of the right side, which agrees except at exact ties, where the strict inequality
    needs +1.
    """
    if not tau > 0:
        raise PlanningError(f"the minimum gain must be positive, got {tau}")
    bound = np.sqrt(np.asarray(A, dtype=float) / tau + 0.25) - b - 0.5
    return np.maximum(np.floor(bound + _EPS) + 1, 1.0)


def gain_fraction(k: Any, b: Any, k_max: int = 9) -> np.ndarray:
    """Share of the k=1 -> ``k_max`` loss drop reached at k (``R(k)`` in docs/law.md)."""
    k = np.asarray(k, dtype=float)
    return (1 / (1 + b) - 1 / (k + b)) / (1 / (1 + b) - 1 / (k_max + b))


def k_for_fraction(frac: float, b: Any, k_max: int = 9) -> np.ndarray:
    """Smallest k in [1, k_max] with ``gain_fraction(k) >= frac`` (k80: 0.8, k90: 0.9)."""
    if not 0 < frac <= 1:
        raise PlanningError(f"fraction must lie in (0, 1], got {frac}")
    b = np.asarray(b, dtype=float)
    q = 1 / (1 + b) - frac * (1 / (1 + b) - 1 / (k_max + b))
    return np.clip(np.ceil(1 / q - b - _EPS), 1.0, k_max)


@dataclass(frozen=True)
class ThreePointForecast:
    """``L_inf + A/(k+b)`` solved exactly from the mean losses at k = 1, 2, 4.

    ``clamped`` is True when the exact b was negative and the fit was redone with b = 0.
    ``forecast``/``forecast_ci`` are at ``k``; ``observed`` and ``rel_error`` are filled in when
    the sweep measured that k. ``failed_draws`` is the share of Monte Carlo draws whose three
    means did not bend like the law: the interval describes the others only.
    """

    L_inf: float
    A: float
    b: float
    clamped: bool
    k: int
    forecast: float
    forecast_ci: tuple[float, float] | None = None
    observed: float | None = None
    rel_error: float | None = None
    failed_draws: float | None = None

    def predict(self, k: Any) -> np.ndarray:
        return self.L_inf + self.A / (np.asarray(k, dtype=float) + self.b)


def _three_point_arrays(y1: Any, y2: Any, y4: Any) -> tuple[np.ndarray, ...]:
    """Vectorised exact solve; NaN where the three losses are not a decreasing convex curve."""
    y1, y2, y4 = (np.asarray(v, dtype=float) for v in (y1, y2, y4))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (y1 - y2) / (y2 - y4)
        valid = (y1 > y2) & (y2 > y4) & (r > 0.5)
        b = (4 - 2 * r) / (2 * r - 1)
    clamped = valid & (b < 0)
    b = np.where(clamped, 0.0, b)
    a = (y1 - y2) * (1 + b) * (2 + b)
    floor = y1 - a / (1 + b)
    # b = 0 refit: weighted (w = k) least squares of y on [1, 1/k] over k = 1, 2, 4.
    k = np.array([1.0, 2.0, 4.0])
    design = np.column_stack([np.ones(3), 1 / k]) * np.sqrt(k)[:, None]
    coef = np.linalg.pinv(design) @ (
        np.stack([y1, y2, y4], axis=0).reshape(3, -1) * np.sqrt(k)[:, None]
    )
    floor = np.where(clamped, coef[0].reshape(floor.shape), floor)
    a = np.where(clamped, coef[1].reshape(a.shape), a)
    nan = np.where(valid, 0.0, np.nan)
    return floor + nan, a + nan, b + nan, clamped


def three_point_recipe(y1: float, y2: float, y4: float, k: int = 9) -> ThreePointForecast:
    """Fit ``L_inf, A, b`` on the mean losses at k = 1, 2, 4 and forecast k.

    Exact solve (docs/law.md section 5): ``r = (y1-y2)/(y2-y4)``, ``b = (4-2r)/(2r-1)``,
    clamped at 0 with a weighted refit if negative; ``A = (y1-y2)(1+b)(2+b)``,
    ``L_inf = y1 - A/(1+b)``.

    >>> f = three_point_recipe(0.5 + 0.1 / 1.5, 0.5 + 0.1 / 2.5, 0.5 + 0.1 / 4.5)
    >>> round(f.b, 6), round(f.forecast, 6)
    (0.5, 0.510526)

    Raises:
        PlanningError: if the losses do not decrease, or flatten too slowly for a 1/(k+b) tail.
    """
    floor, a, b, clamped = (v.item() for v in _three_point_arrays(y1, y2, y4))
    if np.isnan(floor):
        raise PlanningError(
            f"three-point recipe: losses at k=1,2,4 ({y1:.4g}, {y2:.4g}, {y4:.4g}) must "
            "decrease with (y1-y2)/(y2-y4) > 1/2 to follow L_inf + A/(k+b); measure more k"
        )
    return ThreePointForecast(floor, a, b, bool(clamped), k, floor + a / (k + b))


@dataclass(frozen=True)
class Plan:
    """Planning answers for one fitted group at one base size N.

    Each ``*_ci`` is the ``level`` interval over bootstrap (or Wald) parameter draws; a None
    upper end means some draws put the answer out of reach (target at or below their floor).
    A None answer means "not requested" when its input (``target_loss``, ``eps``,
    ``min_gain``) is None, and "infeasible" otherwise (see ``notes``).
    """

    group: dict[str, Any]
    N: float | None
    L_inf: float
    A: float
    b: float
    level: float
    k_max: int
    k80: int
    k90: int
    marginal_gain: list[float]
    target_loss: float | None = None
    k_for_target: int | None = None
    k_for_target_ci: tuple[int | None, int | None] | None = None
    eps: float | None = None
    k_eps: int | None = None
    k_eps_ci: tuple[int | None, int | None] | None = None
    min_gain: float | None = None
    k_stop: int | None = None
    k_stop_ci: tuple[int | None, int | None] | None = None
    k80_ci: tuple[int | None, int | None] | None = None
    k90_ci: tuple[int | None, int | None] | None = None
    three_point: ThreePointForecast | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pool_size: int | None = None
    pool_best: float | None = None  # the curve at k = pool size: merging every expert
    population_floor: float | None = None  # L_inf + A / M: the floor of the experts' population

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> list[str]:
        """The answers as lines of text, one per question; the CLI and the demo print these."""
        lines = [f"floor L_inf {self.L_inf:.4g}, tail A {self.A:.4g}, b {self.b:.3g}"]
        if self.target_loss is not None:
            value = "unreachable (at or below the floor)"
            if self.k_for_target is not None:
                value = _experts(self.k_for_target)
            ci = _ci_text(self.k_for_target_ci)
            lines.append(f"loss {self.target_loss:.4g} takes {value}{ci}")
        if self.eps is not None:
            ci = _ci_text(self.k_eps_ci)
            lines.append(f"within {self.eps:g} of the floor: {_experts(self.k_eps)}{ci}")
        if self.min_gain is not None:
            lines.append(
                f"stop at k={self.k_stop}{_ci_text(self.k_stop_ci)} (the next expert gains "
                f"< {self.min_gain:g})"
            )
        lines.append(
            f"k80 {self.k80}{_ci_text(self.k80_ci)}, k90 {self.k90}{_ci_text(self.k90_ci)} "
            f"(of the k=1->{self.k_max} gain)"
        )
        if self.pool_size is not None:
            lines.append(
                f"pool of {self.pool_size}: merging all gives {self.pool_best:.4g} on average; "
                f"floor of the population the experts come from {self.population_floor:.4g}"
            )
        tp = self.three_point
        if tp is not None:
            ci = (
                ""
                if tp.forecast_ci is None
                else f" [{tp.forecast_ci[0]:.4g}, {tp.forecast_ci[1]:.4g}]"
            )
            seen = (
                ""
                if tp.observed is None
                else f", observed {tp.observed:.4g} ({tp.rel_error:.2%} off)"
            )
            lines.append(
                f"three-point forecast at k={tp.k} (from k = 1, 2, 4): {tp.forecast:.4g}{ci}{seen}"
            )
        return (
            lines
            + [f"warning: {warning}" for warning in self.warnings]
            + [f"note: {note}" for note in self.notes]
        )


def _experts(k: int | None) -> str:
    return "-" if k is None else f"{k} expert{'' if k == 1 else 's'}"


def _ci_text(ci: tuple[int | None, int | None] | None) -> str:
    if ci is None or ci[0] is None:  # no interval, or unreachable in every draw
        return ""
    lo, hi = ci
    return f" [{lo}, {'unbounded' if hi is None else hi}]"


def _as_int(v: float) -> int | None:
    return int(v) if np.isfinite(v) else None


def _interval(samples: np.ndarray | None, level: float) -> tuple[int | None, int | None] | None:
    if samples is None:
        return None
    lo = np.quantile(samples, (1 - level) / 2, method="lower")
    hi = np.quantile(samples, (1 + level) / 2, method="higher")
    return _as_int(lo), _as_int(hi)


def _answer(
    func: Any,
    point: tuple[float, ...],
    draws: tuple[np.ndarray, ...] | None,
    level: float,
    *args: float,
) -> tuple[int | None, tuple[int | None, int | None] | None]:
    """``func(L_inf, A, b, *args)`` at the point estimate, and its interval over the draws."""
    value = _as_int(float(func(*point, *args)))
    spread = None if draws is None else func(*draws, *args)
    return value, _interval(spread, level)


def plan(
    fit: FitResult,
    *,
    N: float | Sequence[float] | None = None,
    target_loss: float | None = None,
    eps: float | None = None,
    min_gain: float | None = None,
    k_max: int = 9,
    level: float | None = None,
    seed: int = 0,
) -> list[Plan]:
    """Planning answers for ``fit`` at each requested size.

    Args:
        fit: a per-size or joint fit (laws with exponent -1 on k).
        N: size(s) in billions; default: the fit's own size (per-size) or every fitted size
            (joint). A per-size fit returns no plan for other sizes.
        target_loss: loss to reach -> ``k_for_target`` (None if the target is at or below the
            floor).
        eps: distance to the floor -> ``k_eps``.
        min_gain: smallest worthwhile gain per added expert -> ``k_stop``.
        k_max: the K of the k80/k90 gain fractions and of the three-point forecast.
        level: interval coverage (default: the fit's).
        seed: seed of the Wald draws used when the fit has no bootstrap.
    """
    if fit.law.tail is None:
        raise PlanningError(
            f"planning needs the per-size or joint law (exponent -1 on k); this fit is "
            f"{fit.form!r}: refit with --form per-size or --form joint"
        )
    level = fit.level if level is None else level
    samples = fit.param_samples(seed=seed)
    plans = []
    for size in fit.sizes_for(N):
        n_arg = np.nan if size is None else size
        point = tuple(float(v) for v in fit.law.tail(fit.theta, n_arg))
        floor, a, b = point
        draws = None if samples is None else fit.law.tail(samples, n_arg)
        notes = _trust_notes(fit, floor, a)
        k_target = k_target_ci = k_e = k_e_ci = k_s = k_s_ci = None
        if target_loss is not None:
            k_target, k_target_ci = _answer(k_for_target, point, draws, level, target_loss)
            if k_target is None:
                notes.append(f"target {target_loss} is at or below the floor L_inf={floor:.4g}")
        if eps is not None:
            k_e, k_e_ci = _answer(lambda _f, a_, b_, e: k_eps(a_, b_, e), point, draws, level, eps)
        if min_gain is not None:
            k_s, k_s_ci = _answer(
                lambda _f, a_, b_, t: k_stop(a_, b_, t), point, draws, level, min_gain
            )
        k80, k80_ci = _answer(
            lambda _f, _a, b_: k_for_fraction(0.8, b_, k_max), point, draws, level
        )
        k90, k90_ci = _answer(
            lambda _f, _a, b_: k_for_fraction(0.9, b_, k_max), point, draws, level
        )
        pool = fit.pool_size
        answers = {"k_for_target": k_target, "k_eps": k_e, "k_stop": k_s, "k80": k80, "k90": k90}
        warnings = _plan_warnings(fit, answers, pool)
        plans.append(
            Plan(
                group=dict(fit.group),
                N=size,
                L_inf=floor,
                A=a,
                b=b,
                level=level,
                k_max=k_max,
                k80=int(k80),
                k90=int(k90),
                marginal_gain=[float(g) for g in marginal_gain(np.arange(1, k_max), a, b)],
                target_loss=target_loss,
                k_for_target=k_target,
                k_for_target_ci=k_target_ci,
                eps=eps,
                k_eps=k_e,
                k_eps_ci=k_e_ci,
                min_gain=min_gain,
                k_stop=k_s,
                k_stop_ci=k_s_ci,
                k80_ci=k80_ci,
                k90_ci=k90_ci,
                three_point=_three_point_for(fit, size, k_max, level, seed, notes),
                notes=notes,
                warnings=warnings,
                pool_size=pool,
                pool_best=None if pool is None else floor + a / (pool + b),
                population_floor=None if pool is None else floor + a / pool,
            )
        )
    return plans


# The parts of the tail (L_inf, A, b) each answer reads.
_ANSWER_PARTS = {
    "k_for_target": ("L_inf", "A", "b"),
    "k_eps": ("A", "b"),
    "k_stop": ("A", "b"),
    "k80": ("b",),
    "k90": ("b",),
}


def _plan_warnings(fit: FitResult, answers: Mapping[str, Any], pool: int | None) -> list[str]:
    """Answers that rest on a parameter a bound decided, and answers the pool cannot reach."""
    given = {name: parts for name, parts in _ANSWER_PARTS.items() if answers[name] is not None}
    warnings = answer_warnings(fit.law, fit.pinned, given)
    if pool is not None:
        warnings += [
            f"{name} = {int(answers[name])} needs more experts than the pool has ({pool}): it "
            "extrapolates the curve past the measured merges"
            for name in given
            if answers[name] > pool
        ]
    return warnings


def _trust_notes(fit: FitResult, floor: float, tail: float) -> list[str]:
    """What makes every answer of a plan doubtful, said up front."""
    notes = []
    if not np.isfinite(fit.r2) or fit.r2 < POOR_FIT_R2:
        notes.append(
            f"the law fits these records poorly (R^2 {fit.r2:.2f}): the answers rest on a curve "
            "the data do not follow; look at the figure (hf-mergelaw plot) before using them"
        )
    if not tail > _EPS * max(1.0, abs(floor)):
        notes.append(
            "the fitted tail A is 0: in these records the loss does not fall as experts are "
            "added, so no answer about k says anything"
        )
    return notes


def _three_point_for(
    fit: FitResult, size: float | None, k_max: int, level: float, seed: int, notes: list[str]
) -> ThreePointForecast | None:
    """Three-point recipe on the fit's observed cell means at this size, with a Monte Carlo
    interval from each cell's standard error."""
    cells = fit.cells
    here = at_size(cells.N, size)
    by_k = {int(k): i for i, k in enumerate(cells.k) if here[i]}
    if fit.law.target != "mean" or not {1, 2, 4} <= set(by_k):
        return None
    idx = [by_k[1], by_k[2], by_k[4]]
    y = cells.observed[idx]
    try:
        forecast = three_point_recipe(*y, k=k_max)
    except PlanningError as exc:
        notes.append(str(exc))
        return None
    se = np.sqrt(np.nan_to_num(cells.var[idx]) / cells.n[idx])
    rng = np.random.default_rng(seed)
    draws = y + se * rng.standard_normal((2000, 3))
    floor, a, b, _ = _three_point_arrays(*draws.T)
    curve = floor + a / (k_max + b)
    failed = float(np.mean(~np.isfinite(curve)))
    if failed > 0:
        notes.append(
            f"three-point interval: {failed:.0%} of the Monte Carlo draws of the k=1,2,4 means "
            "do not bend like the law and are left out, so the interval is conditional on the rest"
        )
    curve = curve[np.isfinite(curve)]
    ci = None
    if curve.size:
        lo, hi = np.quantile(curve, [(1 - level) / 2, (1 + level) / 2])
        ci = (float(lo), float(hi))
    observed = rel = None
    if k_max in by_k:
        observed = float(cells.observed[by_k[k_max]])
        rel = abs(forecast.forecast - observed) / observed
    return ThreePointForecast(
        forecast.L_inf,
        forecast.A,
        forecast.b,
        forecast.clamped,
        k_max,
        forecast.forecast,
        ci,
        observed,
        rel,
        failed,
    )


@dataclass(frozen=True)
class CostModel:
    """Cost of a plan (N, k) = ``base(N) + k * per_expert(N)``.

    ``base`` and ``per_expert`` are numbers or ``{N: cost}`` tables, interpolated log-log in N
    (linearly when a table has zeros) and extended along the end segments.

    >>> model = CostModel(base={7: 100.0, 72: 1000.0}, per_expert=5.0, unit="GPU-h")
    >>> round(float(model.cost(7, 3)), 6)
    115.0
    """

    base: float | Mapping[float, float] = 0.0
    per_expert: float | Mapping[float, float] = 1.0
    unit: str = "cost"

    @classmethod
    def merge_time(cls, method: str = "average") -> CostModel:
        """Seconds to merge, from the paper's 9-expert timings, assuming time grows with the
        checkpoints read (base + k experts): ``t9(N) * (k + 1) / 10``."""
        name = _METHOD_ALIASES.get(method, method)
        if name not in MERGE_SECONDS_9:
            raise PlanningError(
                f"no merge-time table for method {method!r}; known: {sorted(MERGE_SECONDS_9)}"
            )
        per_checkpoint = {
            n: t / 10 for n, t in zip(PAPER_SIZES, MERGE_SECONDS_9[name], strict=True)
        }
        return cls(per_checkpoint, per_checkpoint, f"merge seconds ({name})")

    def cost(self, N: Any, k: Any) -> np.ndarray:
        return _at(self.base, N) + np.asarray(k, dtype=float) * _at(self.per_expert, N)

    def to_dict(self) -> dict[str, Any]:
        def table(v: float | Mapping[float, float]) -> Any:
            return {str(n): c for n, c in v.items()} if isinstance(v, Mapping) else v

        return {"base": table(self.base), "per_expert": table(self.per_expert), "unit": self.unit}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        """From ``{"base": number | {N: cost}, "per_expert": ..., "unit": "..."}``."""

        def table(v: Any) -> float | dict[float, float]:
            return (
                {float(n): float(c) for n, c in v.items()} if isinstance(v, Mapping) else float(v)
            )

        unknown = set(data) - {"base", "per_expert", "unit"}
        if unknown:
            raise PlanningError(
                f"cost model: unknown keys {sorted(unknown)} (use base, per_expert, unit)"
            )
        return cls(
            table(data.get("base", 0.0)),
            table(data.get("per_expert", 1.0)),
            data.get("unit", "cost"),
        )


def _at(spec: float | Mapping[float, float], N: Any) -> np.ndarray:
    n = np.asarray(N, dtype=float)
    if not isinstance(spec, Mapping):
        return np.full(n.shape, float(spec))
    sizes = np.array(sorted(spec), dtype=float)
    costs = np.array([spec[s] for s in sorted(spec)], dtype=float)
    if sizes.size == 1:
        return np.full(n.shape, costs[0])
    log_space = bool(np.all(costs > 0))
    xs, ys, xq = np.log(sizes), np.log(costs) if log_space else costs, np.log(n)
    # np.interp clamps at the ends; extend with the end segments' slopes instead.
    out = np.interp(xq, xs, ys)
    lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    hi_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    out = np.where(xq < xs[0], ys[0] + lo_slope * (xq - xs[0]), out)
    out = np.where(xq > xs[-1], ys[-1] + hi_slope * (xq - xs[-1]), out)
    return np.exp(out) if log_space else np.maximum(out, 0.0)


@dataclass(frozen=True)
class Option:
    """One (N, k) choice: predicted loss with its interval, and its cost."""

    N: float
    k: int
    mean: float
    lo: float
    hi: float
    cost: float


@dataclass(frozen=True)
class Tradeoff:
    """Size versus experts for one joint fit.

    ``cheapest``: lowest-cost option whose predicted mean meets ``target_loss``;
    ``cheapest_confident``: the same with the upper interval end meeting it;
    ``best_within_budget``: lowest predicted mean with cost <= ``budget``.
    """

    group: dict[str, Any]
    unit: str
    level: float
    options: list[Option]
    target_loss: float | None = None
    cheapest: Option | None = None
    cheapest_confident: Option | None = None
    budget: float | None = None
    best_within_budget: Option | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for opt in data["options"]:
            opt.update({key: json_float(opt[key]) for key in ("lo", "hi")})
        return data


def size_vs_experts(
    fit: FitResult,
    cost_model: CostModel | None = None,
    *,
    sizes: Sequence[float] = PAPER_SIZES,
    k_max: int = 9,
    target_loss: float | None = None,
    budget: float | None = None,
    level: float | None = None,
) -> Tradeoff:
    """Compare every (N, k) with N in ``sizes`` and k in 1..k_max under ``cost_model``.

    Default cost model: merge time from the paper's table for the group's ``method``
    (``average`` when the group has none).
    """
    if "N" not in fit.law.variables or fit.law.target != "mean":
        raise PlanningError(
            "the size-versus-experts trade-off needs a law of the mean in N and k: "
            "refit with --form joint"
        )
    notes = []
    if cost_model is None:
        method = fit.group.get("method") or "average"
        try:
            cost_model = CostModel.merge_time(method)
        except PlanningError:
            cost_model = CostModel.merge_time("average")
            notes.append(f"no merge-time table for method {method!r}; used average's")
    nn, kk = np.meshgrid(np.asarray(sizes, dtype=float), np.arange(1, k_max + 1), indexing="ij")
    pred = fit.predict(nn.ravel(), kk.ravel(), level=level)
    costs = cost_model.cost(pred.N, pred.k)
    options = [
        Option(
            float(pred.N[i]),
            int(pred.k[i]),
            float(pred.mean[i]),
            float(pred.lo[i]),
            float(pred.hi[i]),
            float(costs[i]),
        )
        for i in range(pred.mean.size)
    ]

    def cheapest(ok: Any) -> Option | None:
        chosen = [o for o in options if ok(o)]
        return min(chosen, key=lambda o: (o.cost, o.mean)) if chosen else None

    best = None
    if budget is not None:
        affordable = [o for o in options if o.cost <= budget]
        best = min(affordable, key=lambda o: (o.mean, o.cost)) if affordable else None
        if best is None:
            notes.append(f"no option costs at most {budget} {cost_model.unit}")
    result = Tradeoff(
        group=dict(fit.group),
        unit=cost_model.unit,
        level=pred.level,
        options=options,
        target_loss=target_loss,
        budget=budget,
        best_within_budget=best,
        notes=notes,
    )
    if target_loss is None:
        return result
    found = cheapest(lambda o: o.mean <= target_loss)
    confident = cheapest(lambda o: o.hi <= target_loss)
    if found is None:
        notes.append(f"no option reaches {target_loss} within N <= {max(sizes):g}, k <= {k_max}")
    return Tradeoff(**{**result.__dict__, "cheapest": found, "cheapest_confident": confident})
