"""The merging scaling law: laws, fitting with uncertainty, prediction and planning.

Quick start::

    from hf_mergelaw.law import fit_sweep, plan
    report = fit_sweep("sweep.jsonl", form="joint", by=("method",), bootstrap=200)
    fit = report.fits[0]
    fit.predict(N=72, k=range(1, 10))
    plan(fit, N=72, target_loss=0.45, min_gain=0.002)

``docs/law.md`` states the forms (section 2), the fitting practice (section 4) and the planning
formulas (section 5). Built-in laws are in :mod:`hf_mergelaw.law.laws`, the paper's tables in
:mod:`hf_mergelaw.law.paper`, synthetic sweeps in :mod:`hf_mergelaw.law.synthetic`.
"""

from ..errors import LawError
from .fit_result import FitReport, FitResult, Prediction
from .fitting import fit_law, fit_sweep
from .laws import Law, get_law
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
from .records import SweepRecords, load_records

__all__ = [
    "CostModel",
    "FitReport",
    "FitResult",
    "Law",
    "LawError",
    "Plan",
    "Prediction",
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
    "marginal_gain",
    "plan",
    "size_vs_experts",
    "three_point_recipe",
]
