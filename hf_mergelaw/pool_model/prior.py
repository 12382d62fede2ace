"""Prior means of the effects: what a pool model knows before a merge.

To second order a merge's loss holds ``Q_ij = u_i' H u_j`` for every pair of the vectors the
experts add (docs/law.md section 3): ``beta_i`` has ``Q_ii / 2`` and
``gamma_ij = (Q_ij - (Q_ii + Q_jj) / 2) / 2``. With the curvature ``H`` unknown, its isotropic
stand-in ``h I`` makes the weight-space Gram matrix ``G_ij = u_i . u_j`` a predictor of both, at
no forward pass. The pool model takes such predictors as *features*: each effect's prior mean is
``sum_c eta_c features[c]``, with the scales ``eta`` flat (fitted, like the curve) and each
effect's deviation from that mean shrunk as before. A feature that predicts nothing costs one
degree of freedom; one that does lets far fewer merges pin the interactions::

    prior = weight_prior(experts, gram)                  # gram: (M, M) of the method's vectors
    model = fit_pool(records, prior=prior)
    model.source["prior"]["scales"]                      # the fitted eta per feature

The Gram costs one pass over the experts' weights and no forward pass
(:func:`hf_mergelaw.priors.pool_weight_prior`). On the demo pool it lifts the held-out
R^2 of Average's pool model from 0.94 to 0.99 at 29 merges (benchmarks/adaptive_sweep.py). The
loss's own second-order effects are a sharper prior of the same kind
(:meth:`.geometry.PoolGeometry.effect_prior`). An adaptive sweep keeps each method's prior
beside its records (:func:`priors_path`), where ``pool fit`` finds it (:func:`kept_priors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import read_json, write_json
from .design import effect_design, pairs
from .errors import PoolModelError

WEIGHT_FEATURES = ("beta ~ |u_i|^2", "gamma ~ u_i . u_j", "gamma ~ |u_i|^2 + |u_j|^2")


@dataclass(frozen=True)
class EffectPrior:
    """Features of the effects over ``experts`` (sorted names, as pool records sort them): row c
    of ``features`` is a direction over ``[beta (M), gamma pairs (P)]`` named ``names[c]``."""

    experts: tuple[str, ...]
    features: np.ndarray
    names: tuple[str, ...]
    kind: str

    def __post_init__(self) -> None:
        m = len(self.experts)
        width = m + m * (m - 1) // 2
        if self.features.ndim != 2 or self.features.shape != (len(self.names), width):
            raise PoolModelError(
                f"a prior over {m} experts needs one feature row of {width} values per name "
                f"({len(self.names)}); got shape {self.features.shape}."
            )
        if not np.isfinite(self.features).all():
            raise PoolModelError(
                f"{self.kind} prior: its features hold NaN or infinity; the experts' weights "
                "are not finite."
            )

    @property
    def size(self) -> int:
        return len(self.names)

    def fold(self, q: int) -> np.ndarray:
        """The matrix taking ``[curve (q), eta (c), deviations]`` to ``[curve, effects]``."""
        width = self.features.shape[1]
        out = np.zeros((q + width, q + self.size + width))
        out[:q, :q] = np.eye(q)
        out[q:, q : q + self.size] = self.features.T
        out[q:, q + self.size :] = np.eye(width)
        return out

    def check_pool(self, experts: Sequence[str], label: str) -> None:
        if tuple(experts) != self.experts:
            raise PoolModelError(
                f"{label}: the {self.kind} prior is over {', '.join(self.experts)}, the records "
                f"over {', '.join(experts)}; compute the prior for the same pool."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "experts": list(self.experts),
            "names": list(self.names),
            "features": self.features.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EffectPrior:
        return cls(
            tuple(data["experts"]),
            np.array(data["features"], dtype=float),
            tuple(data["names"]),
            str(data["kind"]),
        )

    def describe(self, scales: np.ndarray) -> dict[str, Any]:
        """What ``PoolModel.source["prior"]`` records: the kind and each feature's fitted scale."""
        return {
            "kind": self.kind,
            "scales": dict(zip(self.names, map(float, scales), strict=True)),
        }


def effect_columns(
    members: np.ndarray, prior: EffectPrior | None, overlap: float = 1.0
) -> np.ndarray:
    """The design columns after the curve's for subsets ``members``: the prior's scales first
    (each feature's combination of the effect columns), then beta and the gamma pairs."""
    x = effect_design(members, overlap)
    return x if prior is None else np.hstack([x @ prior.features.T, x])


def weight_prior(experts: Sequence[str], gram: np.ndarray) -> EffectPrior:
    """The prior of the Gram matrix of the vectors each expert adds (``gram[i, j] = u_i . u_j``):
    ``beta`` follows the diagonal; ``gamma`` the off-diagonal and the pair's summed diagonal,
    with scales of their own (the expansion ties them, ``1/2`` and ``-1/4`` times h, only where
    the curvature is isotropic). Each feature is scaled to unit mean magnitude so the fitted
    scales read alike whatever the model's size."""
    gram = np.asarray(gram, dtype=float)
    m = len(experts)
    if gram.shape != (m, m):
        raise PoolModelError(f"a Gram matrix of {m} experts is ({m}, {m}); got {gram.shape}.")
    i, j = pairs(m)
    diagonal, off = np.diag(gram), gram[i, j]
    features = np.zeros((3, m + i.size))
    features[0, :m] = diagonal / unit_scale(diagonal)
    features[1, m:] = off / unit_scale(off)
    features[2, m:] = (diagonal[i] + diagonal[j]) / unit_scale(diagonal)
    return EffectPrior(tuple(experts), features, WEIGHT_FEATURES, "weights")


def unit_scale(values: np.ndarray) -> float:
    """The mean magnitude a feature is divided by (1 for an all-zero feature)."""
    scale = float(np.mean(np.abs(values))) if values.size else 0.0
    return scale if scale > 0 else 1.0


def priors_path(records: Path) -> Path:
    """Where an adaptive sweep keeps its methods' priors: beside its records."""
    return records.with_name(f"{records.stem}.priors.json")


def stored_prior(
    records: Path, label: str, kind: str, experts: Sequence[str]
) -> EffectPrior | None:
    """Method ``label``'s prior of ``kind`` over ``experts`` as the sweep writing ``records``
    stored it, or None (none stored, or one of another kind or pool)."""
    path = priors_path(records)
    if not path.exists():
        return None
    entry = read_json(path, "the sweep's priors file").get("priors", {}).get(label)
    if entry is None or entry["kind"] != kind or tuple(entry["experts"]) != tuple(experts):
        return None
    return EffectPrior.from_dict(entry)


def store_prior(records: Path, label: str, prior: EffectPrior) -> None:
    """Keep method ``label``'s prior beside ``records`` (replacing an older one of it)."""
    path = priors_path(records)
    stored = read_json(path, "the sweep's priors file") if path.exists() else {"priors": {}}
    stored["priors"][label] = prior.to_dict()
    write_json(path, stored)


def kept_priors(records: Path) -> dict[str, EffectPrior]:
    """Every method's prior an adaptive sweep kept beside ``records`` (none: no such file)."""
    path = priors_path(records)
    if not path.exists():
        return {}
    stored = read_json(path, "the sweep's priors file")["priors"]
    return {label: EffectPrior.from_dict(entry) for label, entry in stored.items()}
