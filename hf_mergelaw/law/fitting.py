"""Fitting laws to sweep records: weighted, bounded, multi-start least squares with a bootstrap.

Practice follows ``docs/law.md`` section 4: the points are per-(N, k) subset means, weights
are proportional to k (``sigma = 1/sqrt(k)``) because the subset variance falls like 1/k, all
exponents and offsets are bounded below by 0, and several starts are refined with scipy's
trust-region-reflective least squares, keeping the best.

Usage::

    >>> from hf_mergelaw.law import fit_sweep
    >>> report = fit_sweep("sweep.jsonl", form="joint", by=("method", "domain"),
    ...                    bootstrap=200, seed=0)                          # doctest: +SKIP
    >>> report.fits[0].params, report.fits[0].ci                         # doctest: +SKIP

Starting points: for built-in laws the parameters that enter linearly (``L_star, B, A0``) are
solved in closed form on a grid over the others (exponents and b), so every grid point costs one
small linear solve; the best few grid points are refined. Formula and callable laws get a grid
over their bounds instead.

Bootstrap: each replicate resamples the subsets of every (N, k) cell with replacement,
recomputes the cell statistics and refits from the point estimate, with the zero floors of
``gamma`` and ``b`` relaxed (:meth:`Law.for_intervals`: fits often sit on them, and a bootstrap
that cannot cross a bound makes extrapolated intervals too narrow). Percentiles of the replicate
parameters, clipped to the bounds, give the intervals; the replicates are kept so predictions
get curve intervals.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from math import comb
from typing import Any, Literal

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from ..errors import FitError, LawError
from .diagnostics import bound_warnings, forecast, lack_of_fit
from .experts import PoolOffsets, pool_offsets
from .fit_result import Bootstrap, FitReport, FitResult, FittedCells
from .laws import Bound, Law, Param, get_law, variance_companion
from .records import CellTable, RecordSource, SweepRecords, at_size, load_records, make_cells
from .uncertainty import numeric_or_exact_jacobian, z_value

Weights = Literal["k", "none", "inverse-variance", "sampling"]
Target = Literal["population", "pool"]
TARGETS: tuple[str, ...] = ("population", "pool")
Loss = Literal["linear", "huber"]
WEIGHTS: tuple[str, ...] = ("k", "none", "inverse-variance", "sampling")
LOSSES: tuple[str, ...] = ("linear", "huber")

_N_REFINE = 5
_MAX_GENERIC_STARTS = 512
# Huber's classical tuning constant (95% efficiency under normal noise) and the MAD -> sd factor.
_HUBER_C, _MAD_TO_SD = 1.345, 1.4826
# Scaled residuals that overflow are replaced so the optimiser backs away instead of aborting.
_BAD_RESIDUAL = 1e6


@dataclass(frozen=True)
class _Problem:
    """One weighted least-squares problem: law values at ``x`` should match ``y``."""

    law: Law
    x: dict[str, np.ndarray]
    y: np.ndarray
    sqrt_w: np.ndarray
    loss: str
    f_scale: float = 1.0
    max_nfev: int | None = None

    @property
    def scale(self) -> float:
        # Residuals are divided by the spread of y so gradient tolerances mean the same thing
        # for CE (~0.5) and for subset variances (~1e-3).
        spread = float(np.std(self.y))
        return spread if spread > 0 else max(float(np.abs(self.y).max()), 1e-12)

    def with_y(self, y: np.ndarray) -> _Problem:
        return replace(self, y=y)

    def weighted_sse(self, theta: np.ndarray) -> float:
        r = (self.law.evaluate(theta, self.x) - self.y) * self.sqrt_w
        return float(np.sum(r**2)) if np.all(np.isfinite(r)) else np.inf

    def solve(self, start: np.ndarray) -> Any:
        law, x, y, sqrt_w, scale = self.law, self.x, self.y, self.sqrt_w, self.scale

        def residuals(theta: np.ndarray) -> np.ndarray:
            r = (law.evaluate(theta, x) - y) * sqrt_w / scale
            return np.nan_to_num(r, nan=_BAD_RESIDUAL, posinf=_BAD_RESIDUAL, neginf=-_BAD_RESIDUAL)

        def exact_jac(theta: np.ndarray) -> np.ndarray:
            return np.nan_to_num(law.jac(theta, x) * (sqrt_w / scale)[:, None])

        jac: Callable[[np.ndarray], np.ndarray] | str = exact_jac if law.jac else "2-point"
        return least_squares(
            residuals,
            np.clip(start, law.lower, law.upper),
            jac=jac,
            bounds=(law.lower, law.upper),
            method="trf",
            loss=self.loss,
            f_scale=self.f_scale,
            x_scale="jac",
            max_nfev=self.max_nfev,
        )


def fit_law(
    data: RecordSource | SweepRecords,
    form: str | Law = "joint",
    *,
    params: Mapping[str, Param | Bound | tuple] | None = None,
    weights: Weights = "k",
    loss: Loss = "linear",
    bootstrap: int = 0,
    seed: int | Sequence[int] = 0,
    level: float = 0.9,
    variance: bool = True,
    max_nfev: int | None = None,
    group: Mapping[str, Any] | None = None,
    pool_size: int | None = None,
    target: Target = "population",
) -> FitResult:
    """Fit one law to the records of one group.

    Args:
        data: records (see :func:`load_records`) of one group; per-size laws need a single N.
        form: ``"per-size"``, ``"joint"``, ``"variance"``, ``"variance-per-size"``,
            ``"free-exponent"``, a formula string, or a :class:`Law`.
        params: bounds overrides for built-ins / parameter declarations for formulas, e.g.
            ``{"c": (0, 10), "a": (0, None), "d": (0.1, 3, 1.0)}`` (lower, upper[, start]).
        weights: ``"k"`` (paper: sigma = 1/sqrt(k)), ``"none"``, ``"inverse-variance"`` (the
            observed variance of each cell statistic; cells without one get c/k), or, for
            variance laws, ``"sampling"`` (the sampling error of a sample variance,
            ``V sqrt(2/(n-1))``, with V from a first fit).
        loss: ``"linear"`` least squares or ``"huber"`` (scale from the linear fit's MAD).
        bootstrap: number of replicates (0 = Wald intervals from the Jacobian).
        seed: bootstrap seed.
        level: coverage of the reported intervals.
        variance: also fit the variance law (for prediction intervals) when cells allow.
        max_nfev: cap on function evaluations per optimiser run (None: scipy's default).
        group: grouping values stored on the result.
        pool_size: experts in the pool (default: the distinct names in the records' subsets);
            it gives the variance law its finite-pool form and plans their limit.
        target: what the intervals are about. ``"population"`` (default, what planning needs):
            the curve of the population the experts come from, so they include how far a pool
            of these few experts sits from it (:mod:`hf_mergelaw.law.experts`; records need
            their ``subset`` names). ``"pool"``: this pool's own curve, every subset of these
            experts (a cell that holds all of them has no sampling error).

    Raises:
        FitError: one k value, fewer cells than parameters, too few sizes for an N law, or no
            start converged.
    """
    law = get_law(form, params)
    if weights not in WEIGHTS:
        raise LawError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if loss not in LOSSES:
        raise LawError(f"loss must be one of {LOSSES}, got {loss!r}")
    z_value(level)
    records = data if isinstance(data, SweepRecords) else load_records(data)
    group = dict(group or {})
    sizes = np.unique(records.N[np.isfinite(records.N)])
    if "N" not in law.variables and sizes.size == 1:
        # A per-size fit only describes its own size; keep it with the result.
        group.setdefault("N", float(sizes[0]))
    label = _label(group)
    cells = _usable_cells(law, make_cells(records), label)
    notes: list[str] = []
    y = cells.mean if law.target == "mean" else cells.var
    w = _weights(weights, law.target, cells, notes)
    problem = _Problem(law, cells.x, y, np.sqrt(w), "linear", max_nfev=max_nfev)
    theta = _multistart(problem, label)
    if weights == "sampling":
        w = _sampling_weights(cells, law.evaluate(theta, cells.x))
        problem = replace(problem, sqrt_w=np.sqrt(w))
        theta = _refine(problem, [theta], label)
    if loss == "huber":
        problem = _huber_problem(problem, theta)
        theta = _refine(problem, [theta], label)
    pool = pool_size if pool_size is not None else records.pool_size
    if target not in TARGETS:
        raise LawError(f"target must be one of {TARGETS}, got {target!r}")
    effects = pool_offsets(records) if law.target == "mean" else None
    offsets = effects if target == "population" else None
    if target == "population" and law.target == "mean" and offsets is None:
        notes.append(
            "the records name no subsets, so the intervals treat subsets as independent draws "
            "and ignore which experts the pool happens to have (add each record's subset)"
        )

    fitted = law.evaluate(theta, problem.x)
    resid = y - fitted
    dof = len(y) - len(theta)
    s2 = float(np.sum(w * resid**2) / dof) if dof > 0 else np.nan
    covariance = _covariance(law, theta, problem, s2, cells, offsets)
    boot = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        finite = pool if target == "pool" else None
        own_pool = pool if target == "population" and law.target == "mean" else None
        boot = _bootstrap(
            problem, cells, theta, fitted, bootstrap, rng, seed, offsets, finite, own_pool
        )
        if not boot.usable:
            notes.append(
                f"only {boot.params.shape[0]} of {bootstrap} bootstrap refits succeeded; "
                "intervals are Wald intervals"
            )
    stderr, ci = _intervals(law, theta, covariance, boot, level)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    result_fit = FitResult(
        law=law,
        group=group,
        params=dict(zip(law.param_names, map(float, theta), strict=True)),
        stderr=stderr,
        ci=ci,
        level=level,
        r2=1 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else np.nan,
        rmse=float(np.sqrt(np.mean(resid**2))),
        n_points=int(cells.n.sum()),
        n_cells=len(cells),
        cells=FittedCells(cells.N, cells.k, y, fitted, cells.var, cells.n),
        weights=weights,
        loss=loss,
        weighted_sse=float(np.sum(w * resid**2)),
        covariance=covariance,
        residual_k_variance=float(np.sum(cells.k * resid**2) / dof) if dof > 0 else np.nan,
        bootstrap=boot,
        notes=notes,
        warnings=bound_warnings(law, theta, group),
        pool_size=pool,
        target=target,
    )
    if variance and law.target == "mean":
        # Subsets of a finite pool vary less as they overlap more (a variance intercept below
        # zero), when merges carry expert effects at all; independent merges do not overlap.
        finite = pool is not None and effects is not None and bool(effects.variance.any())
        result_fit.variance = _companion_variance(
            records, law, weights, max_nfev, group, pool if finite else None, notes
        )
    result_fit.checks = _checks(problem, cells, result_fit, label)
    return result_fit


def fit_sweep(
    data: RecordSource | SweepRecords,
    form: str | Law = "joint",
    *,
    by: Sequence[str] = (),
    strict: bool = False,
    seed: int = 0,
    **options: Any,
) -> FitReport:
    """Load records, split them by ``by`` fields (and by N for laws without N), fit each group.

    ``options`` are passed to :func:`fit_law` (``params``, ``weights``, ``loss``, ``bootstrap``,
    ``level``, ``variance``, ``max_nfev``, ``pool_size``, ``target``). Group ``i`` bootstraps
    with seed ``[seed, i]``. A group that cannot be fitted is listed in ``report.failed`` with
    its reason and the others are fitted; only when none can be is it an error.

    >>> report = fit_sweep(records, form="per-size", by=("method",))      # doctest: +SKIP
    >>> [(f.group, f.params["A"]) for f in report.fits]                   # doctest: +SKIP
    """
    records = data if isinstance(data, SweepRecords) else load_records(data, strict=strict)
    law = get_law(form, options.pop("params", None))
    keys = list(by)
    if "N" not in law.variables and records.has_sizes and "N" not in keys:
        keys.append("N")
    fits, failed = [], []
    groups = records.groups(keys)
    for i, (group, recs) in enumerate(groups):
        try:
            fits.append(fit_law(recs, law, seed=[seed, i], group=group, **options))
        except FitError as error:
            if len(groups) == 1:
                raise
            failed.append({"group": group, "error": str(error)})
    if not fits:
        raise FitError(
            f"no group could be fitted; the first: {failed[0]['error']} "
            f"(and {len(failed) - 1} more)"
        )
    return FitReport(
        fits=fits,
        form=law.name,
        by=tuple(by),
        dropped=dict(records.dropped),
        n_records=records.n_read,
        failed=failed,
    )


def _label(group: Mapping[str, Any] | None) -> str:
    if not group:
        return "the records"
    return "group " + ", ".join(f"{k}={v}" for k, v in group.items())


def _usable_cells(law: Law, cells: CellTable, label: str) -> CellTable:
    """Cells the law can be fitted to, or a FitError saying why there are not enough."""
    if law.target == "var":
        cells = cells.select(cells.n >= 2)
        if len(cells) == 0:
            raise FitError(
                f"{label}: the variance law needs cells with at least two subsets each; "
                "every (N, k) cell holds one record"
            )
    sizes = np.unique(cells.N[np.isfinite(cells.N)])
    if "N" in law.variables and np.isnan(cells.N).any():
        raise FitError(
            f"{label}: the {law.name} law uses N but the records carry no N; add N (billions) "
            "to each record or use --form per-size"
        )
    if "N" not in law.variables and sizes.size > 1:
        raise FitError(
            f"{label}: {sizes.size} sizes in one group but the {law.name} law has no N; "
            "fit each size separately (fit_sweep groups by N) or use --form joint"
        )
    n_sizes_needed = 3 if law.name in ("joint", "variance") else 1
    if "N" in law.variables and sizes.size < n_sizes_needed:
        raise FitError(
            f"{label}: the {law.name} law needs at least {n_sizes_needed} base sizes to "
            f"separate the floor terms, got {sizes.size} ({', '.join(f'{s:g}' for s in sizes)}); "
            "use --form per-size"
        )
    distinct_k = np.unique(cells.k)
    if distinct_k.size < 2:
        raise FitError(
            f"{label}: only one k value (k={distinct_k[0]}); a law in k needs merges at "
            "two or more k values: add them, or drop this group"
        )
    n_params = len(law.params)
    if len(cells) < n_params:
        raise FitError(
            f"{label}: {len(cells)} (N, k) cells for {n_params} parameters of the {law.name} "
            "law; add k values or sizes, or use a law with fewer parameters (--form per-size)"
        )
    return cells


def _weights(scheme: str, target: str, cells: CellTable, notes: list[str]) -> np.ndarray:
    k = cells.k.astype(float)
    if scheme == "sampling" and target != "var":
        raise LawError("weights 'sampling' are for variance laws; use k or inverse-variance")
    if scheme in ("k", "sampling"):  # "sampling" starts from k, then reweights at the fit
        return k
    if scheme == "none":
        return np.ones_like(k)
    var = cells.var.copy()
    known = np.isfinite(var) & (var > 0)
    if not known.any():
        raise FitError(
            "inverse-variance weights need cells with at least two distinct subsets; "
            "use --weights k"
        )
    if not known.all():
        # Impute with the paper's Var ~ 1/k shape, calibrated on the cells that have a variance.
        var[~known] = np.median(var[known] * k[known]) / k[~known]
        notes.append(f"{int((~known).sum())} cells had no subset variance; imputed as c/k")
    if target == "mean":
        return cells.n / var
    # Sampling variance of a sample variance under normality: 2 sigma^4 / (n - 1).
    return (cells.n - 1) / (2 * var**2)


def _sampling_weights(cells: CellTable, fitted_var: np.ndarray) -> np.ndarray:
    """1 / (sampling variance of a sample variance), 2 V^2 / (n - 1), at the fitted V."""
    floor = max(float(np.abs(fitted_var).max()) * 1e-3, 1e-300)
    scale = np.maximum(np.abs(fitted_var), floor)
    w = (cells.n - 1) / (2 * scale**2)
    return w / w.mean()


def _start_points(problem: _Problem) -> np.ndarray:
    """Candidate starts, best (lowest weighted SSE) first."""
    law = problem.law
    candidates = _separable_starts(problem) if law.separable is not None else _grid_starts(law)
    costs = np.array([problem.weighted_sse(c) for c in candidates])
    order = np.argsort(costs, kind="stable")
    return candidates[order][np.isfinite(costs[order])]


def _separable_starts(problem: _Problem) -> np.ndarray:
    law, sep = problem.law, problem.law.separable
    assert sep is not None
    index = {p.name: i for i, p in enumerate(law.params)}
    grids = {}
    for name, values in sep.grid.items():
        p = law.params[index[name]]
        grids[name] = (
            [p.start] if p.start is not None else sorted(set(np.clip(values, p.lower, p.upper)))
        )
    lin = [index[n] for n in sep.linear]
    out = []
    for combo in itertools.product(*grids.values()):
        eta = dict(zip(grids, combo, strict=True))
        basis = sep.basis(eta, problem.x) * problem.sqrt_w[:, None]
        coef, *_ = np.linalg.lstsq(basis, problem.y * problem.sqrt_w, rcond=None)
        theta = np.empty(len(law.params))
        theta[lin] = np.clip(coef, law.lower[lin], law.upper[lin])
        for name, value in eta.items():
            theta[index[name]] = value
        out.append(theta)
    return np.array(out)


def _grid_starts(law: Law) -> np.ndarray:
    """Starts for laws without structure: a few points inside each parameter's bounds."""

    def candidates(p: Param) -> list[float]:
        if p.start is not None:
            return [p.start]
        lo, hi = p.lower, p.upper
        if np.isfinite(lo) and np.isfinite(hi):
            return [lo + f * (hi - lo) for f in (0.1, 0.5, 0.9)]
        if np.isfinite(lo):
            return [lo + 0.1, lo + 1.0]
        if np.isfinite(hi):
            return [hi - 0.1, hi - 1.0]
        return [0.1, 1.0]

    grid = np.array(list(itertools.product(*(candidates(p) for p in law.params))))
    if len(grid) > _MAX_GENERIC_STARTS:
        # Deterministic thinning keeps the fit reproducible without a user seed.
        pick = np.random.default_rng(0).choice(len(grid), _MAX_GENERIC_STARTS, replace=False)
        grid = grid[np.sort(pick)]
    return grid


def _multistart(problem: _Problem, label: str) -> np.ndarray:
    starts = _start_points(problem)
    if len(starts) == 0:
        raise FitError(
            f"{label}: the {problem.law.name} law is not finite at any starting point; "
            "check the formula and the parameter bounds"
        )
    return _refine(problem, list(starts[:_N_REFINE]), label)


def _refine(problem: _Problem, starts: Sequence[np.ndarray], label: str) -> np.ndarray:
    best = None
    statuses = []
    for start in starts:
        result = problem.solve(start)
        statuses.append(result.status)
        if _converged(result) and (best is None or result.cost < best.cost):
            best = result
    if best is None and problem.law.separable is not None and problem.loss == "linear":
        best = _projected_solve(problem, starts[0])
    if best is None:
        budget = "scipy's default" if problem.max_nfev is None else problem.max_nfev
        raise FitError(
            f"{label}: the {problem.law.name} fit did not converge from any of {len(starts)} "
            f"starts within {budget} function evaluations (least_squares status {statuses}); "
            "try --loss huber, a simpler form, tighter --param bounds, or check the data"
        )
    return best.x


def _converged(result: Any) -> bool:
    return result is not None and result.status > 0 and bool(np.isfinite(result.cost))


def _projected_solve(problem: _Problem, start: np.ndarray) -> Any:
    """Variable projection: search only the nonlinear parameters (exponents, offsets), solving
    the linear ones (``L_star, B, A0``) by bounded linear least squares at every step, then
    polish all parameters together from there. A ridge that defeats the full search (the floor
    and tail trading off) is flat in far fewer directions here. None if it fails too."""
    law, sep = problem.law, problem.law.separable
    assert sep is not None
    index = {name: i for i, name in enumerate(law.param_names)}
    lin = [index[name] for name in sep.linear]
    nonlin = [i for i in range(len(law.params)) if i not in lin]
    names = [law.param_names[i] for i in nonlin]
    target = problem.y * problem.sqrt_w / problem.scale

    def linear_part(eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        basis = sep.basis(dict(zip(names, eta, strict=True)), problem.x)
        design = basis * (problem.sqrt_w / problem.scale)[:, None]
        solved = lsq_linear(design, target, bounds=(law.lower[lin], law.upper[lin]))
        return solved.x, design @ solved.x - target

    outer = least_squares(
        lambda eta: np.nan_to_num(linear_part(eta)[1], nan=_BAD_RESIDUAL),
        np.clip(start[nonlin], law.lower[nonlin], law.upper[nonlin]),
        bounds=(law.lower[nonlin], law.upper[nonlin]),
        method="trf",
        x_scale="jac",
        max_nfev=problem.max_nfev,
    )
    if not _converged(outer):
        return None
    theta = np.empty(len(law.params))
    theta[nonlin] = outer.x
    theta[lin] = linear_part(outer.x)[0]
    polished = problem.solve(theta)
    return (
        polished if _converged(polished) and polished.cost <= outer.cost else _Solved(theta, outer)
    )


@dataclass(frozen=True)
class _Solved:
    """A projected solution in the shape of scipy's result (x, cost, status)."""

    x: np.ndarray
    outer: Any

    @property
    def cost(self) -> float:
        return float(self.outer.cost)

    @property
    def status(self) -> int:
        return int(self.outer.status)


def _huber_problem(problem: _Problem, theta: np.ndarray) -> _Problem:
    r = (problem.law.evaluate(theta, problem.x) - problem.y) * problem.sqrt_w / problem.scale
    sd = _MAD_TO_SD * float(np.median(np.abs(r - np.median(r))))
    return replace(problem, loss="huber", f_scale=max(_HUBER_C * sd, 1e-8))


def _covariance(
    law: Law,
    theta: np.ndarray,
    problem: _Problem,
    s2: float,
    cells: CellTable,
    offsets: PoolOffsets | None,
) -> np.ndarray:
    """Wald covariance; with pool offsets, plus their part (a sandwich: shifts shared by the
    cells of a size do not average out the way independent cell errors do)."""
    jw = numeric_or_exact_jacobian(law, theta, problem.x) * problem.sqrt_w[:, None]
    if not np.isfinite(s2) or not np.all(np.isfinite(jw)):
        return np.full((len(theta), len(theta)), np.nan)
    bread = np.linalg.pinv(jw.T @ jw)
    covariance = s2 * bread
    if offsets is not None:
        gain = bread @ jw.T * problem.sqrt_w[None, :]  # d theta / d y
        covariance = covariance + gain @ offsets.cell_covariance(cells.N) @ gain.T
    return covariance


def _resampled_statistics(
    cells: CellTable,
    target: str,
    n_boot: int,
    rng: np.random.Generator,
    pool_size: int | None = None,
) -> np.ndarray:
    """(n_boot, n_cells) cell statistics after resampling each cell's subsets with replacement.

    Resampled means are spread by sqrt(n/(n-1)) so their variance matches the unbiased s^2/n
    (the plain bootstrap is short by (n-1)/n, which matters for the 9-subset cells at k=1).
    A cell with one subset has nothing to resample; its mean is perturbed by a normal draw
    with variance c/k, c calibrated on the multi-subset cells of the same size (the paper's
    Var ~ 1/k), so the single-merge cells (k = M) do not look noise-free.
    """
    out = np.empty((n_boot, len(cells)))
    single_var = _single_merge_variance(cells)
    fpcs = _finite_pool_scale(cells, pool_size) ** 2
    for j, values in enumerate(cells.values):
        n = values.size
        fpc = fpcs[j]
        if n == 1:
            spread = np.sqrt(single_var[j] * fpc)
            out[:, j] = values[0] + spread * rng.standard_normal(n_boot)
            continue
        draws = values[rng.integers(0, n, size=(n_boot, n))]
        if target == "mean":
            inflate = np.sqrt(n / (n - 1) * fpc)
            out[:, j] = values.mean() + inflate * (draws.mean(axis=1) - values.mean())
        else:
            out[:, j] = draws.var(axis=1, ddof=1)
    return out


def _finite_pool_scale(cells: CellTable, pool_size: int | None) -> np.ndarray:
    """Per cell, sqrt(1 - n / C(M, k)): how much less a cell mean varies when its subsets are
    drawn without replacement from a known pool of M (zero when it holds all of them)."""
    if pool_size is None:
        return np.ones(len(cells))
    pairs = zip(cells.k, cells.n, strict=True)
    total = np.array([max(comb(pool_size, int(k)), int(n)) for k, n in pairs])
    return np.sqrt(1 - cells.n / total)


def _single_merge_variance(cells: CellTable) -> np.ndarray:
    """Per-cell variance of one merge: observed where a cell has two subsets, else c_N / k."""
    known = np.isfinite(cells.var)
    scaled = cells.var * cells.k
    overall = float(np.median(scaled[known])) if known.any() else 0.0
    out = np.empty(len(cells))
    for j in range(len(cells)):
        same = known & at_size(cells.N, cells.N[j])
        c = float(np.median(scaled[same])) if same.any() else overall
        out[j] = cells.var[j] if known[j] else c / cells.k[j]
    return out


def _bootstrap(
    problem: _Problem,
    cells: CellTable,
    theta: np.ndarray,
    fitted: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
    seed: int | Sequence[int],
    offsets: PoolOffsets | None = None,
    pool_size: int | None = None,
    own_pool: int | None = None,
) -> Bootstrap:
    """Replicates of the cell statistics, refitted: subsets resampled within cells (scaled by
    the finite-population factor for the pool's own curve), plus, for the population curve,
    the shift of a resampled pool of experts (``offsets``). With ``own_pool`` (a population
    fit of a known pool) the same draws are refitted as the pool's own curve as well."""
    own = None
    if (cells.n >= 2).any():
        kind = "subsets" if offsets is None else "experts"
        ys = _resampled_statistics(cells, problem.law.target, n_boot, rng, pool_size)
        if own_pool is not None:
            # The same draws as the pool's own curve would see them: finite-pool scaled, no shift.
            own = cells.mean + _finite_pool_scale(cells, own_pool) * (ys - cells.mean)
        if offsets is not None:
            ys = ys + offsets.draw(cells.N, n_boot, rng)
    else:
        # Nothing to resample within cells: resample weighted residuals instead, inflated for
        # the parameters' degrees of freedom.
        kind = "residuals"
        m, p = len(fitted), len(theta)
        e = (problem.y - fitted) * problem.sqrt_w * np.sqrt(m / max(m - p, 1))
        ys = fitted + rng.choice(e, size=(n_boot, m)) / problem.sqrt_w
    refit = replace(problem, law=problem.law.for_intervals())
    params, failed = _refits(refit, ys, theta)
    pool_params = None if own is None else _refits(refit, own, theta)[0]
    seed_json = seed if isinstance(seed, int) else [int(s) for s in seed]
    return Bootstrap(n_boot, seed_json, kind, failed, params, pool_params)


def _refits(problem: _Problem, ys: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, int]:
    """The converged refits of each replicate ``ys`` from ``theta``, and how many failed."""
    replicates, failed = [], 0
    for y in ys:
        result = problem.with_y(y).solve(theta)
        if result.status > 0 and np.all(np.isfinite(result.x)):
            replicates.append(result.x)
        else:
            failed += 1
    return np.array(replicates).reshape(-1, len(theta)), failed


def _intervals(
    law: Law, theta: np.ndarray, covariance: np.ndarray, boot: Bootstrap | None, level: float
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    names = law.param_names
    if boot is not None and boot.usable:
        se = boot.params.std(axis=0, ddof=1)
        lo, hi = np.quantile(boot.params, [(1 - level) / 2, (1 + level) / 2], axis=0)
        lo, hi = np.clip(lo, law.lower, law.upper), np.clip(hi, law.lower, law.upper)
    else:
        with np.errstate(invalid="ignore"):
            se = np.sqrt(np.diag(covariance))
        z = z_value(level)
        lo = np.clip(theta - z * se, law.lower, law.upper)
        hi = np.clip(theta + z * se, law.lower, law.upper)
    stderr = dict(zip(names, map(float, se), strict=True))
    ci = {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi, strict=True)}
    return stderr, ci


def _checks(problem: _Problem, cells: CellTable, fit: FitResult, label: str) -> dict[str, Any]:
    """Leave-one-k-out and leave-one-size-out forecasts, and lack of fit (diagnostics)."""
    law, y = problem.law, problem.y

    def refit(keep: np.ndarray) -> np.ndarray | None:
        sub = replace(problem, x={n: v[keep] for n, v in problem.x.items()}, y=y[keep],
                      sqrt_w=problem.sqrt_w[keep])  # fmt: skip
        try:
            _usable_cells(law, cells.select(keep), label)
            return law.evaluate(_multistart(sub, label), problem.x)
        except FitError:
            return None

    largest_k = cells.k == cells.k.max()
    checks: dict[str, Any] = {
        "leave_out_k": forecast(f"k={int(cells.k.max())}", largest_k, y, refit),
        "leave_out_size": None,
        "lack_of_fit": None,
    }
    if "N" in law.variables:
        largest = np.isclose(cells.N, np.nanmax(cells.N))
        checks["leave_out_size"] = forecast(f"N={np.nanmax(cells.N):g}", largest, y, refit)
    if law.target == "mean":
        spread = fit._single_merge_variance(cells.x)[0]
        checks["lack_of_fit"] = lack_of_fit(
            fit.residuals, spread, cells.n, cells.k, fit.pool_size, len(law.params)
        )
    return {name: None if c is None else c.to_dict() for name, c in checks.items()}


def _companion_variance(
    records: SweepRecords,
    law: Law,
    weights: str,
    max_nfev: int | None,
    group: Mapping[str, Any] | None,
    pool_size: int | None,
    notes: list[str],
) -> FitResult | None:
    cells = make_cells(records)
    if not (cells.n >= 2).any():
        notes.append(
            "no variance law: every cell holds one merge, so prediction intervals use the "
            "residual scatter of the cells"
        )
        return None
    n_sizes = np.unique(cells.N[np.isfinite(cells.N)]).size
    vlaw = variance_companion(law, n_sizes, finite_pool=pool_size is not None)
    try:
        return fit_law(
            records,
            vlaw,
            weights="none" if weights == "none" else "sampling",
            variance=False,
            max_nfev=max_nfev,
            group=group,
            pool_size=pool_size,
        )
    except FitError as exc:
        notes.append(f"no variance law ({exc}); prediction intervals use the residual scatter")
        return None
