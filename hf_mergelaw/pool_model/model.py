"""A fitted pool model: the posterior of (f, beta, gamma), predictions with intervals, JSON.

Usage::

    model = fit_pool(pool_records("results.jsonl")[0])
    model.beta["code"], model.gamma_matrix()             # effects (negative = lowers the CE)
    pred = model.predict([("code", "math"), ("bio", "code", "math")])
    pred.mean, pred.lo, pred.hi                          # 90% interval of what a merge measures
    model.draws(1000, seed=0)                            # posterior draws of theta

Intervals are Student-t with the fit's residual degrees of freedom, and a subset's interval holds
the misfit of one merge (``Hyper.noise_var``) beside the parameters' uncertainty: it is the range
a merge of that subset is expected to measure in. ``predict`` is the model's prediction even for
subsets already merged (their records hold what they measured; ``select`` ranks them by that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from ..files import float_from_json
from .design import Curve, design, gamma_matrix, split
from .errors import PoolModelError
from .evidence import Hyper

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FittedRecords:
    """The merges a model was fitted on: measured CE, fitted mean, and the leave-one-out
    prediction (mean and sd, the record left out of the fit at the chosen prior scales)."""

    members: np.ndarray
    ce: np.ndarray
    fitted: np.ndarray
    loo_mean: np.ndarray
    loo_sd: np.ndarray

    @property
    def k(self) -> np.ndarray:
        return self.members.sum(axis=1)


@dataclass(frozen=True)
class SubsetPrediction:
    """Predicted CE of subsets (rows of ``members``) with ``level`` intervals; ``sd`` is the
    predictive sd (parameters and one merge's misfit), ``extrapolated`` marks sizes the records
    did not measure (only a law curve predicts them)."""

    members: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    extrapolated: np.ndarray
    level: float


@dataclass(frozen=True)
class PoolModel:
    """The posterior of one group's pool model (see :mod:`.design` and :mod:`.evidence`).

    ``theta`` is the posterior mean of ``[curve, beta, gamma pairs]``, ``covariance`` its
    posterior covariance, ``dof`` the residual degrees of freedom of the t intervals.
    ``source`` says where the model comes from: ``{"kind": "sweep"}`` (fitted to merges) or
    ``{"kind": "geometry", ...}`` (the second-order expansion, see :mod:`.geometry`), with what
    it ignores and its ``warnings``.
    """

    group: dict[str, Any]
    experts: tuple[str, ...]
    curve: Curve
    hyper: Hyper
    theta: np.ndarray
    covariance: np.ndarray
    dof: float
    level: float
    log_evidence: float
    records: FittedRecords
    source: Mapping[str, Any] = field(default_factory=lambda: {"kind": "sweep"})

    @property
    def m(self) -> int:
        return len(self.experts)

    @property
    def n_records(self) -> int:
        return int(self.records.ce.size)

    def label(self) -> str:
        return "group " + (", ".join(f"{k}={v}" for k, v in self.group.items()) or "all")

    @property
    def overlap(self) -> float:
        """How a member's weight falls with k (:func:`.design.member_weight`)."""
        return self.hyper.overlap

    def rows(self, members: np.ndarray) -> np.ndarray:
        """The design rows of subsets ``members``: a subset's mean is ``rows @ theta``."""
        return design(self.curve, members, self.overlap)

    @property
    def has_intervals(self) -> bool:
        """False for a geometry model no merge calibrated: its misfit is unknown."""
        return not math.isnan(self.hyper.sigma)

    @property
    def warnings(self) -> list[str]:
        return list(self.source.get("warnings", []))

    # --- the parameters -------------------------------------------------------------------

    def effects(self) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and covariance of ``[beta, gamma pairs]`` centred on the pool's
        average expert and average pair. The averages are not identified apart from f(k) (a
        shift of every beta, or of every gamma, moves each size's CE alike), so reported
        effects are relative; predictions and rankings do not depend on the choice."""
        q, m = self.curve.q, self.m
        n_pairs = m * (m - 1) // 2
        centring = np.zeros((m + n_pairs, self.theta.size))
        centring[:m, q : q + m] = np.eye(m) - 1.0 / m
        if n_pairs:
            centring[m:, q + m :] = np.eye(n_pairs) - 1.0 / n_pairs
        return centring @ self.theta, centring @ self.covariance @ centring.T

    @property
    def beta(self) -> dict[str, float]:
        """Each expert's own effect, relative to the pool's average expert (negative = lowers
        the CE)."""
        mean, _ = self.effects()
        return dict(zip(self.experts, map(float, mean[: self.m]), strict=True))

    def beta_interval(self, level: float | None = None) -> dict[str, tuple[float, float]]:
        mean, covariance = self.effects()
        half = self.t_value(level) * np.sqrt(np.diag(covariance)[: self.m])
        return {
            name: (float(b - h), float(b + h))
            for name, b, h in zip(self.experts, mean[: self.m], half, strict=True)
        }

    def gamma_matrix(self) -> np.ndarray:
        """(M, M) pairwise interactions, relative to the pool's average pair (negative =
        synergy: the pair merges better than their own effects say)."""
        mean, _ = self.effects()
        return gamma_matrix(mean[self.m :], self.m)

    def gamma_sd(self) -> np.ndarray:
        _, covariance = self.effects()
        return gamma_matrix(np.sqrt(np.diag(covariance)[self.m :]), self.m)

    def t_value(self, level: float | None = None) -> float:
        level = self.level if level is None else level
        if not 0 < level < 1:
            raise PoolModelError(f"level {level}: an interval coverage lies in (0, 1), e.g. 0.9.")
        return float(stats.t.ppf(0.5 + level / 2, self.dof))

    # --- predictions ----------------------------------------------------------------------

    def members_of(self, subsets: Sequence[Sequence[str]]) -> np.ndarray:
        """Boolean rows of named subsets; names outside the pool are an error."""
        column = {name: i for i, name in enumerate(self.experts)}
        rows = np.zeros((len(subsets), self.m), dtype=bool)
        for r, subset in enumerate(subsets):
            names = [str(name) for name in subset]
            outside = [name for name in names if name not in column]
            if outside:
                raise PoolModelError(
                    f"{', '.join(outside)} not in the pool of {self.label()} "
                    f"({', '.join(self.experts)}); name experts of the pool."
                )
            if not names or len(set(names)) != len(names):
                raise PoolModelError(
                    f"subset {','.join(names) or '(empty)'}: name each expert once, at least one."
                )
            rows[r, [column[name] for name in names]] = True
        return rows

    def predict(
        self, subsets: Sequence[Sequence[str]] | np.ndarray, level: float | None = None
    ) -> SubsetPrediction:
        """Predicted CE of each subset (names, or boolean rows over ``experts``)."""
        members = (
            np.asarray(subsets, dtype=bool)
            if isinstance(subsets, np.ndarray)
            else self.members_of(subsets)
        )
        z = self.rows(members)
        mean, var = self.linear(z)
        k = members.sum(axis=1)
        sd = np.sqrt(var + self.hyper.noise_var(k))
        half = self.t_value(level) * sd
        return SubsetPrediction(
            members=members,
            mean=mean,
            sd=sd,
            lo=mean - half,
            hi=mean + half,
            extrapolated=np.array([self.curve.extrapolated(size) for size in k], dtype=bool),
            level=self.level if level is None else level,
        )

    def linear(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of linear functionals ``rows @ theta``."""
        rows = np.atleast_2d(rows)
        return rows @ self.theta, np.sum((rows @ self.covariance) * rows, axis=1)

    def draws(self, n: int, seed: int = 0) -> np.ndarray:
        """(n, len(theta)) posterior draws: multivariate t with the fit's degrees of freedom,
        so their spread matches the t intervals."""
        rng = np.random.default_rng(seed)
        factor = _factor(self.covariance)
        z = rng.standard_normal((n, self.theta.size))
        if math.isinf(self.dof):
            return self.theta + z @ factor.T
        scale = np.sqrt(self.dof / rng.chisquare(self.dof, size=(n, 1)))
        return self.theta + (z @ factor.T) * scale

    # --- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The documented shape (``group``, ``experts``, ``n_records``, ``beta``, ``gamma``)
        and everything :meth:`from_dict` needs to rebuild the model."""
        f = split(self.theta, self.curve.q, self.m)[0]
        return {
            "group": dict(self.group),
            "experts": list(self.experts),
            "n_records": self.n_records,
            "beta": self.beta,
            "beta_interval": {name: list(pair) for name, pair in self.beta_interval().items()},
            "gamma": self.gamma_matrix().tolist(),
            "gamma_sd": self.gamma_sd().tolist(),
            "curve": {
                **self.curve.to_dict(),
                "params": dict(zip(self.curve.names, f.tolist(), strict=True)),
            },
            "hyper": self.hyper.to_dict(),
            "level": self.level,
            "dof": self.dof,
            "log_evidence": self.log_evidence,
            "source": dict(self.source),
            "posterior": {
                "mean": self.theta.tolist(),
                # Lower triangle row by row: half the numbers of the full matrix.
                "covariance_lower": [
                    row[: i + 1].tolist() for i, row in enumerate(self.covariance)
                ],
            },
            "records": [
                {
                    "subset": [self.experts[i] for i in np.flatnonzero(row)],
                    "ce": float(ce),
                    "fitted": float(fitted),
                    "loo_mean": float(loo_mean),
                    "loo_sd": float(loo_sd),
                }
                for row, ce, fitted, loo_mean, loo_sd in zip(
                    self.records.members,
                    self.records.ce,
                    self.records.fitted,
                    self.records.loo_mean,
                    self.records.loo_sd,
                    strict=True,
                )
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolModel:
        experts = tuple(data["experts"])
        column = {name: i for i, name in enumerate(experts)}
        rows = data["records"]
        members = np.zeros((len(rows), len(experts)), dtype=bool)
        for r, row in enumerate(rows):
            members[r, [column[name] for name in row["subset"]]] = True

        def col(name: str) -> np.ndarray:
            return np.array([float_from_json(row[name]) for row in rows])

        lower = data["posterior"]["covariance_lower"]
        covariance = np.zeros((len(lower), len(lower)))
        for i, row in enumerate(lower):
            covariance[i, : i + 1] = row
        covariance = covariance + np.tril(covariance, -1).T
        return cls(
            group=dict(data["group"]),
            experts=experts,
            curve=Curve.from_dict(data["curve"]),
            hyper=Hyper(**{k: float_from_json(v) for k, v in data["hyper"].items()}),
            theta=np.array(data["posterior"]["mean"], dtype=float),
            covariance=covariance,
            # JSON has no infinity: null is the unbounded dof of a model without records.
            dof=math.inf if data["dof"] is None else float(data["dof"]),
            level=float(data["level"]),
            log_evidence=float_from_json(data["log_evidence"]),
            records=FittedRecords(
                members, col("ce"), col("fitted"), col("loo_mean"), col("loo_sd")
            ),
            source=dict(data.get("source", {"kind": "sweep"})),
        )


def _factor(covariance: np.ndarray) -> np.ndarray:
    """F with F F' = covariance, also where it is semi-definite to rounding (tiny prior scales
    leave directions with almost no variance, where a Cholesky factorisation fails)."""
    values, vectors = np.linalg.eigh(covariance)
    return vectors * np.sqrt(np.clip(values, 0.0, None))
