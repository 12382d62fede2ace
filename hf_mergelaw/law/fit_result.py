"""Fit results: parameters with uncertainty, prediction intervals and a JSON round trip.

Usage::

    report = fit_sweep("sweep.jsonl", form="joint", by=("method",), bootstrap=200)
    fit = report.fits[0]
    fit.params["L_star"], fit.ci["L_star"], fit.r2
    pred = fit.predict(N=72, k=np.arange(1, 10))        # mean, lo/hi (mean curve), pi_lo/pi_hi
    report.save("fit.json"); FitReport.load("fit.json").fits[0].predict(72, 9)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats

from ..errors import FitError, LawError
from ..files import float_from_json, json_float, json_safe, read_json, write_json
from .diagnostics import pinned
from .laws import Law
from .records import at_size
from .uncertainty import numeric_or_exact_jacobian, z_value

FORMAT_VERSION = 1
# Degrees of freedom standing for "known exactly" (a t this wide is a normal).
_LARGE_DOF = 1e6
# Fewer successful bootstrap replicates than this give too rough a percentile interval.
MIN_BOOTSTRAP = 10

PiSource = Literal["variance-law", "residual", "none"]


@dataclass(frozen=True)
class FittedCells:
    """The (N, k) cells a law was fitted to: observed statistic, fitted value, spread, count."""

    N: np.ndarray
    k: np.ndarray
    observed: np.ndarray
    fitted: np.ndarray
    var: np.ndarray
    n: np.ndarray

    @property
    def residuals(self) -> np.ndarray:
        return self.observed - self.fitted

    def to_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "N": json_float(self.N[i]),
                "k": int(self.k[i]),
                "observed": float(self.observed[i]),
                "fitted": float(self.fitted[i]),
                "residual": float(self.residuals[i]),
                "var": json_float(self.var[i]),
                "n": int(self.n[i]),
            }
            for i in range(self.k.size)
        ]

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> FittedCells:
        def col(name: str, dtype: type = float) -> np.ndarray:
            return np.array([float_from_json(r[name]) for r in rows], dtype=dtype)

        return cls(
            col("N"), col("k", int), col("observed"), col("fitted"), col("var"), col("n", int)
        )


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap replicates of the parameter vector.

    ``kind`` is ``"experts"`` (subsets resampled within each (N, k) cell, plus the shift of a
    resampled pool of experts: intervals for the population's curve), ``"subsets"`` (within
    cells only: the records name no subsets, or the intervals are for the pool's own curve) or
    ``"residuals"`` (no cell holds two subsets, so there is nothing to resample within cells).
    """

    requested: int
    seed: int | list[int]
    kind: Literal["experts", "subsets", "residuals"]
    n_failed: int
    params: np.ndarray
    # With kind "experts": the same resampled subsets refitted without the pool's shift, the
    # uncertainty of the pool's own curve, around which its next merge lands.
    pool_params: np.ndarray | None = None

    @property
    def usable(self) -> bool:
        return self.params.shape[0] >= MIN_BOOTSTRAP

    @property
    def own_params(self) -> np.ndarray:
        """Replicates of the fitted pool's own curve."""
        return self.params if self.pool_params is None else self.pool_params


@dataclass(frozen=True)
class Prediction:
    """Predicted statistic with a CI for the mean curve and a PI for one merged model.

    Arrays are flat, one entry per requested (N, k) point. ``ci_source`` is ``"bootstrap"``
    (percentiles of refitted curves) or ``"delta"`` (linearised covariance); ``pi_source`` says
    where the single-merge spread came from: ``"variance-law"`` (the fitted variance law),
    ``"residual"`` (scatter of cell means around the curve scaled as 1/k; exact when cells
    hold one merge each, a lower bound otherwise) or ``"none"`` (variance fits: PI = CI).
    The PI is for one more merge: at a fitted size, of that size's pool (its own curve, not the
    population's that the CI of a population-target fit covers), elsewhere of a new pool (the
    population's curve); plus a Student-t draw of the spread with the degrees of freedom of its
    estimate.
    """

    N: np.ndarray
    k: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    pi_lo: np.ndarray
    pi_hi: np.ndarray
    level: float
    ci_source: Literal["bootstrap", "delta"]
    pi_source: PiSource

    def to_rows(self, group: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return [
            {
                "group": dict(group or {}),
                "N": json_float(self.N[i]),
                "k": json_float(self.k[i]),
                "mean": float(self.mean[i]),
                "lo": json_float(self.lo[i]),
                "hi": json_float(self.hi[i]),
                "pi_lo": json_float(self.pi_lo[i]),
                "pi_hi": json_float(self.pi_hi[i]),
                "level": self.level,
                "pi_source": self.pi_source,
            }
            for i in range(self.mean.size)
        ]


@dataclass
class FitResult:
    """One fitted law for one group of records.

    Attributes:
        law: the fitted :class:`Law`.
        group: the grouping values (e.g. ``{"method": "ties", "domain": "code"}``; per-size fits
            also carry ``"N"``).
        params, stderr, ci: point estimates, standard errors and ``level`` intervals by name
            (bootstrap sd and percentiles when a bootstrap ran, Wald otherwise).
        r2, rmse: unweighted goodness of fit on the cell statistics.
        n_points, n_cells: records used and (N, k) cells fitted.
        cells: observed vs fitted per cell (``cells.residuals`` are the residuals).
        weights, loss: the weighting scheme and loss used; ``weighted_sse`` is sum w r^2.
        covariance: Wald covariance of the parameters (weighted Gauss-Newton).
        residual_k_variance: ``c`` in ``Var(cell mean) ~ c / k`` from the residuals, the
            single-merge spread used when no variance law is available.
        variance: the companion variance-law fit used for prediction intervals, if any.
        notes: anything the user should know (imputed weights, skipped variance fit, ...).
        warnings: what makes the fit's answers doubtful, e.g. parameters a bound decided.
        pool_size: experts in the pool the records come from (None when they name no subsets).
        target: what the intervals describe: ``"population"``, the curve of the population the
            experts come from, or ``"pool"``, these experts' own curve (see :func:`fit_law`).
        checks: ``leave_out_k``, ``leave_out_size`` (forecasts of held-out cells) and
            ``lack_of_fit`` (chi-square against the sampling variance), each None when the
            records cannot support it (see :mod:`hf_mergelaw.law.diagnostics`).
    """

    law: Law
    group: dict[str, Any]
    params: dict[str, float]
    stderr: dict[str, float]
    ci: dict[str, tuple[float, float]]
    level: float
    r2: float
    rmse: float
    n_points: int
    n_cells: int
    cells: FittedCells
    weights: str
    loss: str
    weighted_sse: float
    covariance: np.ndarray
    residual_k_variance: float
    bootstrap: Bootstrap | None = None
    variance: FitResult | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pool_size: int | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    target: str = "population"

    @property
    def pinned(self) -> dict[str, str]:
        """Parameters sitting on a bound: name -> "lower" or "upper"."""
        return pinned(self.law, self.theta)

    @property
    def form(self) -> str:
        return self.law.name

    @property
    def theta(self) -> np.ndarray:
        return np.array([self.params[n] for n in self.law.param_names])

    @property
    def residuals(self) -> np.ndarray:
        return self.cells.residuals

    @property
    def sizes(self) -> np.ndarray:
        """Distinct base sizes in the fitted cells (empty when the records carried none)."""
        return np.unique(self.cells.N[np.isfinite(self.cells.N)])

    def sizes_for(self, requested: float | Sequence[float] | None) -> list[float | None]:
        """The sizes this fit answers for: of ``requested`` (None: the fitted sizes), all of them
        for a law in N; for a per-size fit, its own size if requested (None when it has none)."""
        wanted = None if requested is None else [float(n) for n in np.atleast_1d(requested)]
        if "N" in self.law.variables:
            return [float(s) for s in self.sizes] if wanted is None else wanted
        own = self.group.get("N")
        if wanted is None or own is None or at_size(np.array(wanted), own).any():
            return [own]
        return []

    def param_samples(self, n: int = 1000, seed: int = 0) -> np.ndarray | None:
        """Parameter draws for propagating uncertainty: bootstrap replicates when available,
        otherwise ``n`` normal draws from the Wald covariance clipped to the bounds; None when
        the covariance is not finite."""
        if self.bootstrap is not None and self.bootstrap.usable:
            return self.bootstrap.params
        if not np.all(np.isfinite(self.covariance)):
            return None
        rng = np.random.default_rng(seed)
        draws = rng.multivariate_normal(self.theta, self.covariance, size=n, method="eigh")
        return np.clip(draws, self.law.lower, self.law.upper)

    def predict(
        self, N: float | np.ndarray | None, k: float | np.ndarray, *, level: float | None = None
    ) -> Prediction:
        """Predicted mean (or variance, for variance laws) at every (N, k) pair (broadcast).

        ``N`` may be None for laws without N; a per-size fit only predicts at its own size.
        """
        level = self.level if level is None else level
        x = self._points(N, k)
        mean = self.law.evaluate(self.theta, x)
        z = z_value(level)
        quantiles = [(1 - level) / 2, (1 + level) / 2]
        boot = self.bootstrap
        spread, pi_source = self._single_merge_variance(x)
        dof = self._spread_dof(x, pi_source)
        if boot is not None and boot.usable:
            curves = self.law.evaluate_many(boot.params, x)
            lo, hi = np.nanquantile(curves, quantiles, axis=0)
            ci_source = "bootstrap"
            # One merge at a fitted size is one more merge of that size's pool: a draw of the
            # pool's own curve; elsewhere a new pool's, the population's. Plus its own scatter,
            # Student-t for the spread's estimation error (a normal draw left k = 1 at 80%).
            fitted = self._at_fitted_size(x)
            own = self.law.evaluate_many(boot.own_params, x)
            # One set of draws serves both replicate sets (they may differ in failed refits).
            rows = max(own.shape[0], curves.shape[0])
            noise = np.random.default_rng(0).standard_t(dof, size=(rows, dof.size))
            scatter = np.sqrt(spread) * noise

            def band(centres: np.ndarray) -> np.ndarray:
                return np.nanquantile(centres + scatter[: centres.shape[0]], quantiles, axis=0)

            (own_lo, own_hi), (new_lo, new_hi) = band(own), band(curves)
            # A new pool's merge varies at least as much as the population's mean curve.
            pi_lo = np.where(fitted, own_lo, np.minimum(new_lo, lo))
            pi_hi = np.where(fitted, own_hi, np.maximum(new_hi, hi))
        else:
            grad = numeric_or_exact_jacobian(self.law, self.theta, x)
            with np.errstate(invalid="ignore"):
                se = np.sqrt(np.einsum("ij,jk,ik->i", grad, self.covariance, grad))
            lo, hi, ci_source = mean - z * se, mean + z * se, "delta"
            t = stats.t.ppf((1 + level) / 2, dof)
            half = t * np.sqrt(spread + np.nan_to_num(se) ** 2)
            pi_lo, pi_hi = mean - half, mean + half
        if pi_source == "none":
            pi_lo, pi_hi = lo, hi
        return Prediction(
            N=x.get("N", np.full(mean.shape, np.nan)),
            k=x["k"],
            mean=mean,
            lo=lo,
            hi=hi,
            pi_lo=pi_lo,
            pi_hi=pi_hi,
            level=level,
            ci_source=ci_source,
            pi_source=pi_source,
        )

    def _points(self, N: float | np.ndarray | None, k: float | np.ndarray) -> dict[str, np.ndarray]:
        if "N" not in self.law.variables:
            own = self.group.get("N")
            if N is not None and own is not None and not np.allclose(N, own):
                raise LawError(
                    f"this {self.form} fit is for N={own:g}; it cannot predict other sizes "
                    "(fit --form joint to extrapolate in N)"
                )
            kk = np.atleast_1d(np.asarray(k, dtype=float)).ravel()
            return {"N": np.full(kk.shape, np.nan if own is None else float(own)), "k": kk}
        if N is None:
            raise LawError(f"the {self.form} law needs N (billions of parameters) to predict")
        nn, kk = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(k, dtype=float))
        return {"N": nn.ravel().copy(), "k": kk.ravel().copy()}

    def _at_fitted_size(self, x: Mapping[str, np.ndarray]) -> np.ndarray:
        """Which points lie at a size the fit has a pool of (every point of a per-size fit)."""
        if "N" not in self.law.variables:
            return np.ones(x["k"].shape, dtype=bool)
        return np.isclose(x["N"][:, None], np.unique(self.cells.N)[None, :]).any(axis=1)

    def _spread_dof(self, x: Mapping[str, np.ndarray], source: PiSource) -> np.ndarray:
        """Degrees of freedom of the single-merge variance: 2 (V / se(V))^2 for a variance law
        (its delta-method standard error; a chi-square's), the residual dof otherwise."""
        k = np.asarray(x["k"], dtype=float)
        if source == "variance-law" and self.variance is not None:
            v = self.variance
            var = v.law.evaluate(v.theta, x)
            grad = numeric_or_exact_jacobian(v.law, v.theta, x)
            with np.errstate(invalid="ignore", divide="ignore"):
                se2 = np.einsum("ij,jk,ik->i", grad, v.covariance, grad)
                dof = 2 * var**2 / se2
            return np.clip(np.where(np.isfinite(dof), dof, _LARGE_DOF), 1.0, _LARGE_DOF)
        residual_dof = max(self.n_cells - len(self.theta), 1)
        return np.full_like(k, float(residual_dof))

    def _single_merge_variance(self, x: Mapping[str, np.ndarray]) -> tuple[np.ndarray, PiSource]:
        if self.law.target == "var":
            return np.zeros_like(x["k"]), "none"
        if self.variance is not None:
            var = self.variance.law.evaluate(self.variance.theta, x)
            return np.clip(var, 0.0, None), "variance-law"
        return np.full_like(x["k"], self.residual_k_variance) / x["k"], "residual"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` restores an equivalent result."""
        names = self.law.param_names
        boot = self.bootstrap
        return json_safe(
            {
                "group": self.group,
                "form": self.form,
                "law": self.law.to_dict(),
                "params": self.params,
                "stderr": self.stderr,
                "ci": {n: list(self.ci[n]) for n in names},
                "level": self.level,
                "r2": self.r2,
                "rmse": self.rmse,
                "n_points": self.n_points,
                "n_cells": self.n_cells,
                "weights": self.weights,
                "loss": self.loss,
                "weighted_sse": self.weighted_sse,
                "covariance": self.covariance.tolist(),
                "residual_k_variance": self.residual_k_variance,
                "bootstrap": None
                if boot is None
                else {
                    "requested": boot.requested,
                    "seed": boot.seed,
                    "kind": boot.kind,
                    "n_failed": boot.n_failed,
                    "params": boot.params.tolist(),
                    "pool_params": None if boot.pool_params is None else boot.pool_params.tolist(),
                },
                "cells": self.cells.to_rows(),
                "variance": None if self.variance is None else self.variance.to_dict(),
                "notes": self.notes,
                "warnings": self.warnings,
                "pinned": self.pinned,
                "pool_size": self.pool_size,
                "checks": self.checks,
                "target": self.target,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], callable_law: Law | None = None) -> FitResult:
        law = Law.from_dict(data["law"], callable_law)
        names = law.param_names
        boot = data.get("bootstrap")
        p = len(names)
        return cls(
            law=law,
            group=dict(data["group"]),
            params={n: float(data["params"][n]) for n in names},
            stderr={n: float_from_json(data["stderr"][n]) for n in names},
            ci={n: tuple(float_from_json(v) for v in data["ci"][n]) for n in names},
            level=float(data["level"]),
            r2=float_from_json(data["r2"]),
            rmse=float_from_json(data["rmse"]),
            n_points=int(data["n_points"]),
            n_cells=int(data["n_cells"]),
            cells=FittedCells.from_rows(data["cells"]),
            weights=data["weights"],
            loss=data["loss"],
            weighted_sse=float_from_json(data["weighted_sse"]),
            covariance=np.array(
                [[float_from_json(v) for v in row] for row in data["covariance"]], dtype=float
            ).reshape(p, p),
            residual_k_variance=float_from_json(data["residual_k_variance"]),
            bootstrap=None
            if boot is None
            else Bootstrap(
                requested=int(boot["requested"]),
                seed=boot["seed"],
                kind=boot["kind"],
                n_failed=int(boot["n_failed"]),
                params=np.array(boot["params"], dtype=float).reshape(-1, p),
                pool_params=None
                if boot.get("pool_params") is None
                else np.array(boot["pool_params"], dtype=float).reshape(-1, p),
            ),
            variance=None if data.get("variance") is None else cls.from_dict(data["variance"]),
            notes=list(data.get("notes", [])),
            warnings=list(data.get("warnings", [])),
            pool_size=data.get("pool_size"),
            checks=dict(data.get("checks", {})),
            target=data.get("target", "population"),
        )


@dataclass
class FitReport:
    """All fits of one ``fit_sweep`` call, the groups that could not be fitted (each with its
    reason: one group's failure never takes the others with it) and what was dropped on the way
    in."""

    fits: list[FitResult]
    form: str
    by: tuple[str, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)
    n_records: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"group": ..., "error": ...}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "form": self.form,
            "failed": json_safe(self.failed),
            "by": list(self.by),
            "n_records": self.n_records,
            "dropped": dict(self.dropped),
            "fits": [f.to_dict() for f in self.fits],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], callable_law: Law | None = None) -> FitReport:
        if not isinstance(data, Mapping) or not isinstance(data.get("fits"), list):
            raise LawError("not a fit file: no 'fits' list (write one with `hf-mergelaw fit`)")
        try:
            return cls(
                fits=[FitResult.from_dict(f, callable_law) for f in data["fits"]],
                form=data.get("form", ""),
                by=tuple(data.get("by", ())),
                dropped=dict(data.get("dropped", {})),
                n_records=int(data.get("n_records", 0)),
                failed=list(data.get("failed", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise LawError(
                "the fit file is damaged or was not written by `hf-mergelaw fit` "
                f"({type(error).__name__}: {error}); fit the records again to rewrite it."
            ) from None

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temp file + rename): a failure never leaves a partial file."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FitReport:
        return cls.from_dict(read_json(path, "fit file"))

    def select(self, group: Mapping[str, Any]) -> list[FitResult]:
        """Fits whose group contains every item of ``group`` (values compared as strings)."""
        chosen = [
            f for f in self.fits if all(str(f.group.get(k)) == str(v) for k, v in group.items())
        ]
        if not chosen:
            raise FitError(
                f"no fit matches group {dict(group)}; groups: {[f.group for f in self.fits]}"
            )
        return chosen
