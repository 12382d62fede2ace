"""Paper parameters (../shared/data) and synthetic sweeps for the scaling-law tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from hf_mergelaw.law.synthetic import load_param_table, synthetic_sweep

# CI clones the repository with shared/ beside it.
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@cache
def joint_params() -> dict[tuple[str, str], dict[str, float]]:
    return load_param_table(DATA / "paper_joint_fits.csv")


@cache
def variance_params() -> dict[tuple[str, str], dict[str, float]]:
    return load_param_table(DATA / "paper_variance_fits.csv")


def paper_sweep(method: str, domain: str, **options: Any) -> list[dict[str, Any]]:
    """A synthetic sweep: means from the paper's joint fit for (method, domain), scatter from
    the Average variance fit of the domain (Table 6 only covers Average)."""
    return synthetic_sweep(
        joint_params()[(method, domain)],
        variance_params()[("average", domain)],
        method=method,
        domain=domain,
        **options,
    )
