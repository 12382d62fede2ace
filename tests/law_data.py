"""Synthetic sweeps from the paper's parameter tables, for the scaling-law tests."""

from __future__ import annotations

from typing import Any

from hf_mergelaw.law.paper import joint_fits, variance_fits
from hf_mergelaw.law.synthetic import synthetic_sweep


def paper_sweep(method: str, domain: str, **options: Any) -> list[dict[str, Any]]:
    """A synthetic sweep: means from the paper's joint fit for (method, domain), scatter from
    the Average variance fit of the domain (Table 6 only covers Average)."""
    return synthetic_sweep(
        joint_fits()[(method, domain)],
        variance_fits()[("average", domain)],
        method=method,
        domain=domain,
        **options,
    )
