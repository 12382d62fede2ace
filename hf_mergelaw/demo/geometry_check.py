"""Before merging: the demo pool's geometry model against the merges the demo measured.

Each method's cross-domain model from the loss's gradient and curvature at the base (no merge) is
scored on every merge of the sweep and the held-out merges: the shape of each size (R^2 with
levels set aside, rank correlation) and the level. The same model calibrated on 2M of the
sweep's merges at the calibration sizes (every expert alone, the full pool, then pairs and
half-pool merges in turn) shows what a few merges fix::

    check = check_geometry(priors, records + held_out, fits, geometry_s)
    check.methods[0].scores()["shape_r2"], check.to_dict()
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_mergelaw.law import FitReport
from hf_mergelaw.pool_model import (
    PoolModel,
    PoolRecords,
    PoolReport,
    calibrate,
    calibration_sizes,
    pool_law,
    pool_records,
    shape_r2,
    spearman_within_k,
    within_k_r2,
)
from hf_mergelaw.record_schema import CROSS_DOMAIN


@dataclass(frozen=True)
class GeometryMethod:
    """One method's geometry model, calibrated and not, and the merges it is checked on."""

    method: str
    prior: PoolModel
    calibrated: PoolModel
    measured: PoolRecords  # every cross-domain merge of the demo (sweep and held out)
    fitted_floor: float  # L_inf of the law fitted on the sweep

    def scores(self) -> dict[str, float]:
        ce, k = self.measured.ce, self.measured.k
        zero = self.prior.predict(self.measured.members).mean
        calibrated = self.calibrated.predict(self.measured.members).mean
        return {
            "merges": len(ce),
            "shape_r2": shape_r2(ce, zero, k),
            "spearman": spearman_within_k(ce, zero, k),
            "level_rmse": float(np.sqrt(np.mean((ce - zero) ** 2))),
            "floor": pool_law(self.prior)["L_inf"],
            "fitted_floor": self.fitted_floor,
            "calibrated_r2_within_k": within_k_r2(ce, calibrated, k),
            "calibrated_rmse": float(np.sqrt(np.mean((ce - calibrated) ** 2))),
            "calibration_merges": self.calibrated.n_records,
        }


@dataclass(frozen=True)
class GeometryCheck:
    methods: list[GeometryMethod]
    geometry_s: float  # the curvature of every method
    merge_eval_s: float  # median seconds of one of the sweep's merge-and-evaluate steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "geometry_s": self.geometry_s,
            "merge_eval_s": self.merge_eval_s,
            "methods": {m.method: m.scores() for m in self.methods},
        }


def check_geometry(
    priors: PoolReport,
    records: Sequence[Mapping[str, Any]],
    fits: FitReport,
    geometry_s: float,
) -> GeometryCheck:
    """Score each method's cross-domain geometry model on ``records`` (the demo's merges)."""
    measured = {
        g.group["method"]: g
        for g in pool_records(records, by=("method", "domain"))
        if g.group["domain"] == CROSS_DOMAIN
    }
    floors = {f.group["method"]: f.params["L_inf"] for f in fits.select({"domain": CROSS_DOMAIN})}
    methods = []
    for prior in priors.pools:
        if prior.group["domain"] != CROSS_DOMAIN:
            continue
        method = prior.group["method"]
        group = measured[method]
        rows = _calibration_rows(group.k, prior.m)
        subset = PoolRecords(
            group.group, group.experts, group.members[rows], group.ce[rows], tuple(rows)
        )
        methods.append(
            GeometryMethod(method, prior, calibrate(prior, subset), group, floors[method])
        )
    steps = [float(r["merge_s"]) + float(r["eval_s"]) for r in records]
    return GeometryCheck(methods, geometry_s, float(np.median(steps)))


def _calibration_rows(k: np.ndarray, m: int) -> list[int]:
    """2M of the sweep's merges: every expert alone, then the calibration sizes in turn (as
    ``calibration_subsets`` fills them), each size's in the sweep's order."""
    by_size = [list(np.flatnonzero(k == size)) for size in calibration_sizes(m)]
    # The full pool is one subset; the other sizes take turns.
    rest = by_size[0][:1] + [
        int(r) for turn in itertools.zip_longest(*by_size[1:]) for r in turn if r is not None
    ]
    return [*map(int, np.flatnonzero(k == 1)), *map(int, rest)][: 2 * m]
