"""Synthetic pools with known effects, for tests, benchmarks and examples.

A pool draws ``beta`` and ``gamma`` (optionally with a few far-off experts and a few strongly
interacting pairs), takes f(k) from the per-size law, and measures any subset as the model's L(S)
plus Gaussian misfit of sd ``noise_sd * k^(-rho/2)``; its records look like a sweep's::

    pool = synthetic_pool(8, seed=0, strong_pairs=3)
    rows = pool.records(sample_subsets(8, 3, per_k=8), seed=1)   # plus other sizes
    pool.true_ce(members)                                         # the noise-free L(S)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .design import pairs
from .search import values


@dataclass(frozen=True)
class SyntheticPool:
    """Known f(k) = L_inf + A/(k + b), effects and misfit."""

    experts: tuple[str, ...]
    beta: np.ndarray
    gamma: np.ndarray
    L_inf: float = 2.0
    A: float = 0.6
    b: float = 0.3
    noise_sd: float = 0.002
    rho: float = 1.0
    overlap: float = 1.0

    @property
    def m(self) -> int:
        return len(self.experts)

    def members(self, subsets: Sequence[Sequence[int]]) -> np.ndarray:
        rows = np.zeros((len(subsets), self.m), dtype=bool)
        for r, subset in enumerate(subsets):
            rows[r, list(subset)] = True
        return rows

    def true_ce(self, members: np.ndarray) -> np.ndarray:
        """The model's L(S), no misfit."""
        k = np.asarray(members).sum(axis=1)
        effects = values(self.beta, self.gamma, members, self.overlap)
        return self.L_inf + self.A / (k + self.b) + effects

    def measure(self, members: np.ndarray, seed: int) -> np.ndarray:
        k = np.asarray(members).sum(axis=1)
        noise = np.random.default_rng(seed).standard_normal(k.size)
        return self.true_ce(members) + noise * self.noise_sd * k ** (-self.rho / 2)

    def records(
        self,
        subsets: Sequence[Sequence[int]],
        *,
        seed: int = 0,
        method: str = "average",
        domain: str = "macro",
    ) -> list[dict[str, Any]]:
        """Sweep-like records ``{"method", "params", "k", "subset", "ce", "domain", "N"}``."""
        members = self.members(subsets)
        ce = self.measure(members, seed)
        return [
            {
                "method": method,
                "params": {},
                "k": int(row.sum()),
                "subset": [self.experts[i] for i in np.flatnonzero(row)],
                "ce": float(value),
                "domain": domain,
                "N": 0.001,
            }
            for row, value in zip(members, ce, strict=True)
        ]


def synthetic_pool(
    m: int,
    *,
    seed: int = 0,
    beta_sd: float = 0.05,
    gamma_sd: float = 0.02,
    noise_sd: float = 0.002,
    rho: float = 1.0,
    outliers: int = 0,
    strong_pairs: int = 0,
) -> SyntheticPool:
    """A pool of ``m`` experts named ``e00``, ``e01``, ...

    Args:
        outliers: experts whose own effect is 6 ``beta_sd`` off (heterogeneous pools).
        strong_pairs: pairs whose interaction is +-8 ``gamma_sd`` (strong synergy or conflict).
    """
    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, beta_sd, m)
    beta[rng.choice(m, outliers, replace=False)] += 6 * beta_sd * rng.choice([-1, 1], outliers)
    i, j = pairs(m)
    values = rng.normal(0.0, gamma_sd, i.size)
    strong = rng.choice(i.size, strong_pairs, replace=False)
    values[strong] = 8 * gamma_sd * rng.choice([-1, 1], strong_pairs)
    gamma = np.zeros((m, m))
    gamma[i, j] = values
    gamma[j, i] = values
    return SyntheticPool(
        experts=tuple(f"e{n:02d}" for n in range(m)),
        beta=beta,
        gamma=gamma,
        noise_sd=noise_sd,
        rho=rho,
    )
