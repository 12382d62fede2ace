"""The pool model on the demo's sweep: fitted on the balanced design, checked on merges it was
not fitted on, and its answer to "which experts should I merge?" against merging everything.

    subsets = held_out_subsets(8, settings.sweep)          # index tuples, merged apart
    check = check_pools(report, held_out_records)           # report: fit_pools of the sweep
    check.methods[0].r2_within_k, check.methods[0].overall.subset

Held-out subsets: ``held_out_per_k`` of each k that the sweep left some unmerged, drawn with a
seed among the unmerged ones, the same for every method. They are scored on the cross-domain
curve: R^2 of the within-k deviations and coverage of the model's intervals
(:mod:`hf_mergelaw.pool_model.accuracy`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_mergelaw.pool_model import (
    PoolModel,
    PoolReport,
    Selection,
    coverage,
    pool_records,
    select,
    within_k_r2,
)
from hf_mergelaw.pool_model.report import leave_one_out
from hf_mergelaw.record_schema import CROSS_DOMAIN
from hf_mergelaw.subsets import sample_subsets

from .settings import SweepSettings


def held_out_subsets(num_experts: int, sweep: SweepSettings) -> list[tuple[int, ...]]:
    """Subsets the sweep did not merge, ``sweep.held_out_per_k`` of each size (seeded)."""
    if sweep.strategy == "all":
        return []
    out = []
    for k in range(1, num_experts + 1):
        merged = set(
            sample_subsets(num_experts, k, strategy=sweep.strategy, per_k=sweep.per_k,
                           seed=sweep.seed)
        )  # fmt: skip
        rest = [s for s in itertools.combinations(range(num_experts), k) if s not in merged]
        rng = random.Random(f"held-out-{sweep.seed}-{num_experts}-{k}")
        out += sorted(rng.sample(rest, min(sweep.held_out_per_k, len(rest))))
    return out


@dataclass(frozen=True)
class MethodPool:
    """One method's cross-domain pool model, its check on held-out merges, and its answers."""

    method: str
    model: PoolModel
    held_members: np.ndarray  # (H, M) boolean rows over model.experts
    held_ce: np.ndarray
    best: list[Selection]  # the best subset of each size
    overall: Selection
    everything: float  # the measured CE of merging every expert

    @property
    def r2_within_k(self) -> float:
        if not len(self.held_ce):
            return float("nan")
        prediction = self.model.predict(self.held_members)
        return within_k_r2(self.held_ce, prediction.mean, self.held_members.sum(axis=1))

    @property
    def coverage(self) -> float:
        if not len(self.held_ce):
            return float("nan")
        prediction = self.model.predict(self.held_members)
        return coverage(self.held_ce, prediction.lo, prediction.hi)

    @property
    def leave_one_out(self) -> dict[str, float]:
        """Each fitted merge predicted from the others: R^2 within k and coverage."""
        return leave_one_out(self.model)

    @property
    def held_out_ks(self) -> list[int]:
        return sorted({int(k) for k in self.held_members.sum(axis=1)})

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "fitted_on": self.model.n_records,
            "held_out": len(self.held_ce),
            "held_out_ks": self.held_out_ks,
            "r2_within_k": self.r2_within_k,
            "coverage": self.coverage,
            "level": self.model.level,
            "leave_one_out": self.leave_one_out,
            "best": [s.to_dict() for s in self.best],
            "overall": self.overall.to_dict(),
            "merge_everything_ce": self.everything,
        }


@dataclass(frozen=True)
class PoolCheck:
    methods: list[MethodPool]

    def to_dict(self) -> dict[str, Any]:
        return {"methods": [m.to_dict() for m in self.methods]}


def check_pools(
    report: PoolReport, held_out: Sequence[Mapping[str, Any]], *, seed: int = 0
) -> PoolCheck:
    """Each method's cross-domain model of ``report`` against the held-out records, and its
    best subsets (``select``, top 1, every size and overall)."""
    held = {
        g.group["method"]: g
        for g in (pool_records(held_out, by=("method", "domain")) if held_out else [])
        if g.group["domain"] == CROSS_DOMAIN
    }
    methods = []
    for model in report.pools:
        if model.group.get("domain") != CROSS_DOMAIN:
            continue
        method = model.group["method"]
        group = held.get(method)
        members = model.members_of(group.subsets()) if group else np.zeros((0, model.m), dtype=bool)
        chosen = select(model, top=1, seed=seed)
        methods.append(
            MethodPool(
                method=method,
                model=model,
                held_members=members,
                held_ce=group.ce if group else np.zeros(0),
                best=[s for s in chosen if s.scope == "size" and math.comb(model.m, s.k) > 1],
                overall=next(s for s in chosen if s.scope == "overall"),
                everything=float(model.records.ce[model.records.k == model.m][0]),
            )
        )
    return PoolCheck(methods)
