"""The pool model: every subset's loss from a fraction of the sweep, and which experts to merge.

For merges that add per-expert vectors the loss of a subset S of k experts is, to second order
(docs/law.md section 3),

    L(S) = f(k) + (1/k) sum_{i in S} beta_i + (1/k^2) sum_{i != j in S} gamma_ij

with ``beta_i`` expert i's own effect and ``gamma_ij`` the pair's interaction (negative =
synergy). Its mean over random subsets is the scaling law; the effects are what the law averages
away. The model is fitted to a sweep's records with beta and gamma shrunk toward the exchangeable
model by prior scales chosen by marginal likelihood; every answer has an interval::

    from hf_mergelaw.pool_model import fit_pools, select, greedy_order, pool_curve, next_subsets

    report = fit_pools("results.jsonl", by=("method", "domain"))   # a PoolModel per group
    model = report.pools[0]
    model.predict([("code", "math")]).mean                        # any subset, merged or not
    select(model, top=3)                                          # best per size and overall
    greedy_order(model).order                                     # the order to add experts
    pool_curve(model)                                             # E[L | k] and its spread
    next_subsets(model, 8)                                        # what to merge next
    report.save("pool.json"); PoolReport.load("pool.json")

Modules: ``records`` (sweep records to pools), ``design`` (the linear model), ``evidence``
(prior scales by marginal likelihood), ``fit``, ``model`` (posterior, prediction, JSON),
``expectation`` (exact mean and spread over every subset), ``search`` (best subsets: enumeration
and swap search), ``selection`` (p_best, greedy order), ``acquisition`` (what to merge next),
``accuracy``, ``report`` (the pool file), ``plotting``, ``synthetic`` (pools with known effects),
``geometry`` (the model from the loss's gradient and curvature at the base, with no merge, and
its calibration on a few merges), ``prior`` (effects' prior means from features known before a
merge, such as the experts' weight-space Gram).
"""

from .accuracy import coverage, shape_r2, spearman_within_k, within_k_r2
from .acquisition import (
    Pick,
    answer_targets,
    candidate_subsets,
    next_subsets,
    prediction_targets,
)
from .design import Curve
from .errors import PoolModelError
from .evidence import Hyper
from .expectation import CurvePoint, pool_curve, pool_law, subset_moments
from .fit import check_identifiable, fit_pool, fit_pools, required_records
from .geometry import (
    PoolGeometry,
    calibrate,
    calibration_sizes,
    calibration_subsets,
    geometry_model,
)
from .model import PoolModel, SubsetPrediction
from .prior import EffectPrior, weight_prior
from .records import PoolRecords, pool_records
from .report import PoolReport
from .search import best_subsets
from .selection import GreedyOrder, Selection, greedy_order, select
from .synthetic import SyntheticPool, synthetic_pool

__all__ = [
    "Curve",
    "CurvePoint",
    "EffectPrior",
    "GreedyOrder",
    "Hyper",
    "Pick",
    "PoolGeometry",
    "PoolModel",
    "PoolModelError",
    "PoolRecords",
    "PoolReport",
    "Selection",
    "SubsetPrediction",
    "SyntheticPool",
    "answer_targets",
    "best_subsets",
    "calibrate",
    "calibration_sizes",
    "calibration_subsets",
    "candidate_subsets",
    "check_identifiable",
    "coverage",
    "fit_pool",
    "fit_pools",
    "geometry_model",
    "greedy_order",
    "next_subsets",
    "pool_curve",
    "pool_law",
    "pool_records",
    "prediction_targets",
    "required_records",
    "select",
    "shape_r2",
    "spearman_within_k",
    "subset_moments",
    "synthetic_pool",
    "weight_prior",
    "within_k_r2",
]
