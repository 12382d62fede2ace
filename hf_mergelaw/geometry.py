"""Predict before you merge: the pool model of a sweep YAML's pool from the loss's gradient and
curvature at the base (``hf-mergelaw pool geometry``).

For each method of the YAML, every expert's vector as the method merges it (its task vector;
trimmed or dropped and rescaled first by TIES, DARE, breadcrumbs; times lambda) is one direction
``u_i``. One gradient and M curvature-vector products on the eval data give ``g_i`` and ``Q_ij``
per domain (:mod:`hf_mergelaw.curvature`), so every subset's CE is predicted with no merge
(:mod:`hf_mergelaw.pool_model.geometry`). With ``calibrate=N`` the N calibration subsets (the
experts alone first) are merged and measured like a sweep's, into the sweep's own records file
(a later ``sweep`` skips them), and each group's model is calibrated on them::

    run = pool_geometry(load_sweep_config("sweep.yml"), calibration=11)
    run.report.save("pool.json")          # what `pool fit` writes: predict/select/plot read it
    run.geometry_s, run.merge_eval_s      # the cost, beside a merge-and-evaluate step's
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel

from .adaptive import check_prior, has_prior
from .cross_entropy import EvalSet
from .curvature import CURVATURES
from .errors import CommandError
from .experts import ExpertPool, named_experts
from .files import read_jsonl
from .pool_model import (
    EffectPrior,
    PoolModel,
    PoolReport,
    calibrate,
    calibration_subsets,
    geometry_model,
    pool_records,
)
from .priors import adaptive_prior, float32_base, method_geometries
from .sweep import Job, check_output, load_eval_set, load_pool, sweep_jobs
from .sweep_config import SweepConfig
from .sweep_methods import MethodSpec

BY = ("method", "domain")


@dataclass(frozen=True)
class GeometryRun:
    """The pool models (one per method and domain) and what they cost: seconds spent on the
    curvature, and the mean seconds of one calibration merge-and-evaluate (NaN without any)."""

    report: PoolReport
    geometry_s: float
    merge_eval_s: float
    calibration_merges: int


def pool_geometry(
    config: SweepConfig,
    *,
    curvature: str = "hessian",
    curvature_sample: float = 1.0,
    calibration: int = 0,
    level: float = 0.9,
    progress: bool = True,
) -> GeometryRun:
    """The pool model of every method and domain of ``config`` from the pool's geometry,
    calibrated on ``calibration`` merges per method (0: the geometry alone); the curvature from
    ``curvature_sample`` of each domain's sequences (:func:`~.curvature.lm_second_order`).

    Raises:
        CommandError: a method the expansion cannot express (one mergekit runs, not a fused
            task-arithmetic method), an unknown curvature.
        PoolModelError: a calibration count the pool cannot hold.
    """
    if curvature not in CURVATURES:
        raise CommandError(f"curvature {curvature!r}: use one of {', '.join(CURVATURES)}.")
    for method in config.methods:
        check_expressible(method)
    experts = tuple(sorted(named_experts(config.experts)))
    subsets = calibration_subsets(experts, calibration) if calibration else []
    if subsets:
        check_output(config)
    eval_set = load_eval_set(config)
    pool = load_pool(config)
    start = time.perf_counter()
    base = float32_base(pool)
    priors = [
        model
        for method in config.methods
        for model in method_models(
            pool,
            eval_set,
            method,
            curvature,
            config.eval.batch_size,
            level,
            curvature_sample,
            base=base,
        )
    ]
    geometry_s = time.perf_counter() - start
    if not subsets:
        return GeometryRun(PoolReport(priors, BY), geometry_s, float("nan"), 0)
    jobs = [Job(method, len(s), s) for method in config.methods for s in subsets]
    sweep_jobs(
        pool,
        eval_set,
        jobs,
        output=config.output,
        batch_size=config.eval.batch_size,
        N=config.N,
        seed=config.sampling.seed,
        progress=progress,
    )
    records = _calibration_records(config, subsets)
    groups = {_key(g.group): g for g in pool_records(records, by=BY, experts=experts)}
    pools = [calibrate(prior, groups[_key(prior.group)], level) for prior in priors]
    merge_eval_s = sum(r["merge_s"] + r["eval_s"] for r in records) / len(records)
    return GeometryRun(PoolReport(pools, BY), geometry_s, merge_eval_s, len(subsets))


def config_priors(config: SweepConfig, kind: str) -> dict[str, EffectPrior]:
    """Each method's prior of ``kind`` (``weights`` or ``curvature``) from a sweep YAML's pool,
    as an adaptive sweep of it computes them (:func:`~.priors.adaptive_prior`), by label;
    methods that take no such prior (:func:`~.adaptive.has_prior`) are left out."""
    check_prior(kind)
    methods = [method for method in config.methods if has_prior(kind, method)]
    if not methods:
        return {}
    pool = load_pool(config)
    eval_set = load_eval_set(config) if kind == "curvature" else None
    return {
        method.label: adaptive_prior(pool, method, kind, eval_set, config.eval.batch_size)
        for method in methods
    }


def check_expressible(method: MethodSpec) -> None:
    """Refuse a method whose merge is not theta_0 + (1/k) sum of per-expert vectors."""
    if not method.fused:
        raise CommandError(
            f"method {method.label!r} ({method.name}) runs through mergekit's own merge, which "
            "the second-order expansion cannot express; the geometry covers the task-arithmetic "
            "family (average, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, "
            "breadcrumbs_ties). Fit a sweep of it with `hf-mergelaw pool fit` instead."
        )


def method_models(
    pool: ExpertPool,
    eval_set: EvalSet,
    method: MethodSpec,
    curvature: str,
    batch_size: int,
    level: float,
    curvature_sample: float = 1.0,
    *,
    base: PreTrainedModel | None = None,
) -> list[PoolModel]:
    """One uncalibrated geometry model per domain of the eval set (and the cross-domain one);
    ``base``: the float32 base, when the caller already holds it (:func:`float32_base`)."""
    geometries = method_geometries(
        pool,
        eval_set,
        method,
        curvature=curvature,
        batch_size=batch_size,
        curvature_sample=curvature_sample,
        base=base,
    )
    approximate = method.elects_signs
    return [
        geometry_model(
            {"method": method.label, "domain": domain},
            geometry,
            curvature=curvature,
            curvature_sample=curvature_sample,
            approximate=approximate,
            level=level,
        )
        for domain, geometry in sorted(geometries.items())
    ]


def _calibration_records(
    config: SweepConfig, subsets: Sequence[tuple[str, ...]]
) -> list[dict[str, object]]:
    """The calibration merges' records, read back from the sweep's file (which may hold more)."""
    wanted = {tuple(sorted(s)) for s in subsets}
    labels = {method.label: dict(method.params) for method in config.methods}
    return [
        record
        for _, record in read_jsonl(config.output)
        if record.get("method") in labels
        and record.get("params") == labels[record["method"]]
        and tuple(sorted(record.get("subset", ()))) in wanted
    ]


def _key(group: Mapping[str, object]) -> tuple[str, str]:
    return str(group["method"]), str(group["domain"])
