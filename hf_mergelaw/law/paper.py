"""The paper's published numbers, shipped with the package.

Source: "Model Merging Scaling Laws in Large Language Models" (Wang et al., arXiv 2509.24244):

- ``data/paper_joint_fits.csv``: joint-law parameters ``L_star, B, beta, A0, gamma, b`` (and the
  fit's R^2) per method (Average, TA, TIES) and domain, the paper's Tables 3-5;
- ``data/paper_variance_fits.csv``: variance-law parameters ``V_star, B_v, beta_v, A0_v, gamma_v,
  b_v`` per domain for Average, Table 6 (with N = 72 they give Table 7, e.g. algebra at k = 1:
  0.00148);
- the Qwen2.5 base sizes and the seconds one merge of 9 experts took at each (Section 5).

N is in billions of parameters throughout: the tables reproduce only in those units.

    >>> joint_fits()[("average", "code")]["gamma"] > 0.1
    True
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

ParamTable = dict[tuple[str, str], dict[str, float]]

PAPER_SIZES = (0.5, 1.5, 3.0, 7.0, 14.0, 32.0, 72.0)
"""Qwen2.5 base sizes of the paper, in billions."""

MERGE_SECONDS_9 = {
    "task_arithmetic": (32, 68, 129, 244, 383, 777, 2686),
    "average": (48, 73, 168, 265, 421, 843, 2280),
    "dare": (30, 72, 102, 251, 420, 796, 2360),
    "ties": (43, 77, 136, 270, 507, 961, 2967),
}
"""Seconds per merge of 9 experts at ``PAPER_SIZES``, per method."""


@cache
def joint_fits() -> ParamTable:
    """``{(method, domain): {L_star, B, beta, A0, gamma, b, r2}}`` (Tables 3-5)."""
    return _read_table("paper_joint_fits.csv")


@cache
def variance_fits() -> ParamTable:
    """``{("average", domain): {V_star, B_v, beta_v, A0_v, gamma_v, b_v, r2}}`` (Table 6)."""
    return _read_table("paper_variance_fits.csv")


def _read_table(name: str) -> ParamTable:
    text = resources.files(__package__).joinpath("data", name).read_text()
    return {
        (row.pop("method"), row.pop("domain")): {k: float(v) for k, v in row.items()}
        for row in csv.DictReader(text.splitlines())
    }
