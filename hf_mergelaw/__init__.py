"""hf-mergelaw: merging scaling laws for Hugging Face experts.

Attributes load lazily: ``import hf_mergelaw`` runs from the import hook in every process that
imports evaluate, and must not pull in torch or transformers.

    >>> import evaluate, hf_mergelaw
    >>> metric = evaluate.load(hf_mergelaw.metric_path())
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule defining it.
_LAZY_ATTRIBUTES = {
    "metric_path": "hf_mergelaw.metric_registration",
    "MergeScalingCallback": "hf_mergelaw.callback",
    "ExpertPool": "hf_mergelaw.experts",
    "MethodSpec": "hf_mergelaw.methods",
    "run_sweep": "hf_mergelaw.sweep",
    "sweep_pool": "hf_mergelaw.sweep",
    "load_sweep_config": "hf_mergelaw.sweep_config",
    "build_eval_set": "hf_mergelaw.cross_entropy",
    # Scaling-law engine (numpy/scipy only).
    "CostModel": "hf_mergelaw.law",
    "FitReport": "hf_mergelaw.law",
    "FitResult": "hf_mergelaw.law",
    "Law": "hf_mergelaw.law",
    "LawError": "hf_mergelaw.law",
    "Prediction": "hf_mergelaw.law",
    "fit_law": "hf_mergelaw.law",
    "fit_sweep": "hf_mergelaw.law",
    "load_records": "hf_mergelaw.law",
    "plan": "hf_mergelaw.law",
    "size_vs_experts": "hf_mergelaw.law",
    "three_point_recipe": "hf_mergelaw.law",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


def __getattr__(name: str) -> Any:
    if name not in _LAZY_ATTRIBUTES:
        raise AttributeError(f"module 'hf_mergelaw' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
