"""The pool model as a linear model: one design row per merged subset.

For merges that add per-expert vectors, the second-order expansion of the loss gives, for every
subset S of size k (docs/law.md section 3),

    L(S) = f(k) + (1/k) sum_{i in S} beta_i + (1/k^2) sum_{i != j in S} gamma_ij

The 1/k is each member's share of a merge that averages every member's vector. TIES's disjoint
mean averages an entry only over the members that keep it with the elected sign, so a member
weighs more: ``w(k) = 1 / (1 + overlap (k - 1))`` in place of 1/k (and ``w(k)^2`` of 1/k^2),
``overlap`` the share of the other members that join an entry's mean (1: an average; 0: a plain
sum; about the density times the share of entries whose signs agree for TIES), chosen by
evidence (:mod:`.evidence`). The model is

    L(S) = f(k) + w(k) sum_{i in S} beta_i + w(k)^2 sum_{i != j in S} gamma_ij

which is linear in the parameters ``theta = [curve (q), beta (M), gamma (P)]``: the curve part is
one level per measured k (``free``) or ``L_inf, A`` of ``L_inf + A/(k + b)`` at a given b
(``law``); ``gamma`` holds one value per unordered pair i < j (each enters twice in the sum)::

    curve = Curve.free([1, 2, 4])
    Z = design(curve, members, overlap=1.0)    # (n, 3 + M + M(M-1)/2)
    f, beta, gamma = split(theta, curve.q, M)  # gamma: (M, M), symmetric, zero diagonal
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import PoolModelError

CurveKind = Literal["free", "law"]
CURVES: tuple[str, ...] = ("free", "law")


@dataclass(frozen=True)
class Curve:
    """f(k): ``free`` (a level per measured size, predicts only those) or ``law``
    (``L_inf + A/(k + b)``, predicts any size; sizes outside the measured ones are flagged as
    extrapolated). ``ks`` are the measured sizes."""

    kind: CurveKind
    ks: tuple[int, ...]
    b: float = 0.0

    @classmethod
    def free(cls, ks: Sequence[int]) -> Curve:
        return cls("free", tuple(sorted({int(k) for k in ks})))

    @classmethod
    def law(cls, ks: Sequence[int], b: float) -> Curve:
        return cls("law", tuple(sorted({int(k) for k in ks})), float(b))

    @property
    def q(self) -> int:
        return len(self.ks) if self.kind == "free" else 2

    @property
    def names(self) -> list[str]:
        return [f"f({k})" for k in self.ks] if self.kind == "free" else ["L_inf", "A"]

    def covers(self, k: int) -> bool:
        return self.kind == "law" or int(k) in self.ks

    def extrapolated(self, k: int) -> bool:
        """A size the records did not measure (only a law curve predicts one)."""
        return int(k) not in self.ks

    def basis(self, k: np.ndarray) -> np.ndarray:
        """(n, q) rows of the curve part for sizes ``k``."""
        k = np.asarray(k, dtype=int)
        if self.kind == "law":
            return np.column_stack([np.ones(k.size), 1.0 / (k + self.b)])
        missing = sorted(set(k.tolist()) - set(self.ks))
        if missing:
            raise PoolModelError(
                f"k = {', '.join(map(str, missing))} was not measured; a free f(k) predicts only "
                f"the measured sizes ({', '.join(map(str, self.ks))}). Fit with the per-size law "
                "(--curve law) to predict other sizes (flagged as extrapolation)."
            )
        return (k[:, None] == np.array(self.ks)[None, :]).astype(float)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "ks": list(self.ks), "b": self.b}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Curve:
        kind = data["kind"]
        if kind not in CURVES:
            raise PoolModelError(f"unknown curve {kind!r} in a pool file; use one of {CURVES}.")
        return cls(kind, tuple(int(k) for k in data["ks"]), float(data["b"]))  # type: ignore[arg-type]


def pairs(m: int) -> tuple[np.ndarray, np.ndarray]:
    """The experts (i, j), i < j, of each gamma column, in column order."""
    return np.triu_indices(m, 1)


def member_weight(k: np.ndarray | int, overlap: float = 1.0) -> np.ndarray:
    """``w(k)``, one member's weight in a merge of k (a pair's is ``w(k)^2``): 1/k at overlap 1."""
    return 1.0 / (1.0 + overlap * (np.asarray(k, dtype=float) - 1.0))


def effect_design(members: np.ndarray, overlap: float = 1.0) -> np.ndarray:
    """(n, M + P): ``w(k)`` for each member, ``2 w(k)^2`` for each pair of members."""
    members = np.asarray(members, dtype=bool)
    w = member_weight(members.sum(axis=1, keepdims=True), overlap)
    i, j = pairs(members.shape[1])
    together = members[:, i] & members[:, j]
    return np.hstack([members * w, together * (2.0 * w**2)])


def design(curve: Curve, members: np.ndarray, overlap: float = 1.0) -> np.ndarray:
    """(n, q + M + P) design rows of the subsets ``members`` (boolean, one row per subset)."""
    members = np.asarray(members, dtype=bool)
    return np.hstack([curve.basis(members.sum(axis=1)), effect_design(members, overlap)])


def gamma_matrix(values: np.ndarray, m: int) -> np.ndarray:
    """Pair values (..., P) as symmetric (..., M, M) matrices with a zero diagonal."""
    values = np.asarray(values, dtype=float)
    out = np.zeros((*values.shape[:-1], m, m))
    i, j = pairs(m)
    out[..., i, j] = values
    out[..., j, i] = values
    return out


def split(theta: np.ndarray, q: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(curve part, beta, gamma as (..., M, M)) of parameter vectors (..., q + M + P)."""
    theta = np.asarray(theta, dtype=float)
    return theta[..., :q], theta[..., q : q + m], gamma_matrix(theta[..., q + m :], m)
