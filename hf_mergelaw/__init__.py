"""hf-mergelaw: merging scaling laws for Hugging Face experts.

Attributes load lazily: ``import hf_mergelaw`` runs from the import hook in every process that
imports evaluate, and must not pull in torch or transformers.

    >>> import evaluate, hf_mergelaw
    >>> metric = evaluate.load(hf_mergelaw.metric_path())
"""

from __future__ import annotations

import importlib
from typing import Any

# The submodule defining each public name; the one list the package exports.
_EXPORTS = {
    "hf_mergelaw.callback": ("MergeScalingCallback",),
    "hf_mergelaw.cross_entropy": ("build_eval_set",),
    "hf_mergelaw.errors": ("UserError",),
    "hf_mergelaw.experts": ("ExpertPool",),
    "hf_mergelaw.metric_registration": ("metric_path",),
    "hf_mergelaw.sweep": ("run_sweep", "sweep_pool"),
    "hf_mergelaw.sweep_config": ("load_sweep_config",),
    "hf_mergelaw.sweep_methods": ("MethodSpec",),
    # The scaling law's everyday names (numpy/scipy only); the rest are in hf_mergelaw.law.
    "hf_mergelaw.law": ("FitReport", "FitResult", "Law", "fit_sweep", "load_records", "plan"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hf_mergelaw' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
