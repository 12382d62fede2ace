"""The merging scaling law: laws, fitting with uncertainty, prediction and planning.

Quick start::

    from hf_mergelaw.law import fit_sweep, plan
    report = fit_sweep("sweep.jsonl", form="joint", by=("method",), bootstrap=200)
    fit = report.fits[0]
    fit.predict(N=72, k=range(1, 10))
    plan(fit, N=72, target_loss=0.45, min_gain=0.002)

See ``shared/spec/law.md`` for the forms and the planning formulas.
"""

from .errors import FitError, FormulaError, LawError, PlanningError, RecordsError
from .fitting import fit_law, fit_sweep
from .laws import (
    BUILTIN_LAWS,
    FREE_EXPONENT,
    JOINT,
    PER_SIZE,
    VARIANCE,
    VARIANCE_PER_SIZE,
    Law,
    Param,
    get_law,
)
from .planning import (
    CostModel,
    Plan,
    ThreePointForecast,
    Tradeoff,
    gain_fraction,
    k_eps,
    k_for_fraction,
    k_for_target,
    k_stop,
    marginal_gain,
    plan,
    size_vs_experts,
    three_point_recipe,
)
from .records import CellTable, SweepRecords, load_records, make_cells
from .result import FitReport, FitResult, Prediction

__all__ = [
    "BUILTIN_LAWS",
    "FREE_EXPONENT",
    "JOINT",
    "PER_SIZE",
    "VARIANCE",
    "VARIANCE_PER_SIZE",
    "CellTable",
    "CostModel",
    "FitError",
    "FitReport",
    "FitResult",
    "FormulaError",
    "Law",
    "LawError",
    "Param",
    "Plan",
    "PlanningError",
    "Prediction",
    "RecordsError",
    "SweepRecords",
    "ThreePointForecast",
    "Tradeoff",
    "fit_law",
    "fit_sweep",
    "gain_fraction",
    "get_law",
    "k_eps",
    "k_for_fraction",
    "k_for_target",
    "k_stop",
    "load_records",
    "make_cells",
    "marginal_gain",
    "plan",
    "size_vs_experts",
    "three_point_recipe",
]
