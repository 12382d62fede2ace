"""Adaptive sweeps: merge what the pool model says settles the answer, until it is settled or the
budget is spent.

A method's adaptive sweep starts from a small balanced design (the fewest merges that identify
the pool model, every k of the sweep covered, every expert in equally many), then goes in rounds:
fit the pool model to the method's records (the cross-domain curve), stop if the answer is
settled, else merge the subsets that most reduce the uncertainty of the best subset of each size
and of the pool curve (:func:`~hf_mergelaw.pool_model.next_subsets`). Each round is a function of
the records and the settings alone, so a re-run (after a crash too) continues where the last one
stopped, and every rank of a multi-process sweep computes the same round::

    step = next_round(records, method="ties", experts=names, ks=range(1, 9), budget=40, count=2)
    step.picks      # the subsets to merge now, in pool order; () once it stops
    step.stop       # why it stopped; None while it goes on

With ``prior`` (``sampling.prior``: ``weights``, the default for the fused methods, or
``curvature``; :mod:`hf_mergelaw.priors`) the pool model is fitted with a prior of the effects:
the Gram of the experts' vectors, or the loss's second-order terms along them, predicts the
interactions before any merge, so the start is smaller (a merge per expert beyond the curve and
the prior's scales, not two) and each merge tells more.

Settled means, once the method has a merge per parameter of the pool model and the fit has 10
residual degrees of freedom: at every size with two or more subsets the best subset has p_best
>= 0.9 and the pool curve's interval is narrow (half-width at most 5% of the curve's fall over the
sizes), or the most informative next merge would remove under 1% of the answers' uncertainty on
average.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SweepConfigError
from .pool_model import (
    EffectPrior,
    PoolModel,
    PoolRecords,
    answer_targets,
    candidate_subsets,
    fit_pool,
    next_subsets,
    pool_curve,
    pool_records,
    required_records,
    select,
)
from .pool_model.geometry import GEOMETRY_FEATURES
from .pool_model.prior import WEIGHT_FEATURES
from .record_schema import CROSS_DOMAIN, WHOLE_SET
from .subsets import balanced_design

if TYPE_CHECKING:
    from .sweep_methods import MethodSpec

ADAPTIVE = "adaptive"  # the sweep YAML's sampling.strategy
# sampling.prior of an adaptive sweep, the default first (computed by hf_mergelaw.priors).
PRIORS = ("weights", "curvature", "none")
NO_PRIOR = "none"
FEATURES = {"weights": len(WEIGHT_FEATURES), "curvature": len(GEOMETRY_FEATURES)}
P_BEST_SETTLED = 0.9
# The pool curve is settled when each size's interval half-width is at most this share of the
# curve's fall over the sizes: finer than any question about how many experts to merge.
CURVE_SETTLED = 0.05
# The best next merge removing less than this share of each answer's variance, on average over
# the answers, is not worth making.
SCORE_SETTLED = 0.01
# Residual degrees of freedom before anything counts as settled: the misfit's sd is then known
# to about 1/sqrt(2 * 10), a fifth of itself.
DOF_SETTLED = 10
SELECT_DRAWS = 1000


@dataclass(frozen=True)
class Round:
    """What one method's adaptive sweep does next: merge ``picks`` (subsets in pool order), or
    stop, saying why (``stop``). ``merged``: the method's merges in the records so far."""

    merged: int
    picks: tuple[tuple[str, ...], ...]
    stop: str | None = None


def check_prior(kind: object) -> None:
    """Refuse a ``sampling.prior`` that is not one of :data:`PRIORS`."""
    if kind not in PRIORS:
        raise SweepConfigError(
            f"sampling.prior={kind!r}; use one of {', '.join(PRIORS)} (weights: the experts' "
            "weight-space Gram; curvature: the loss's second-order terms along their vectors; "
            "none: no prior)."
        )


def has_prior(kind: str, method: MethodSpec) -> bool:
    """Whether an adaptive sweep with ``sampling.prior: kind`` fits ``method`` with a prior:
    never a method mergekit merges (not a sum of per-expert vectors), and the weight prior not
    a sign-electing one (on the demo pool its Gram predicted nothing of TIES's interactions,
    and the smaller start cost held-out R^2: 0.93 against 0.95 at 28 merges)."""
    if kind == NO_PRIOR or not method.fused:
        return False
    return not (kind == "weights" and method.elects_signs)


def prior_features(kind: str, methods: Sequence[MethodSpec]) -> int | None:
    """The prior features every method's adaptive sweep has (None: some method has no prior,
    so the start and the budget must identify the model without one)."""
    if not all(has_prior(kind, method) for method in methods):
        return None
    return FEATURES[kind]


def check_adaptive(
    num_experts: int, ks: Sequence[int], budget: int | None, features: int | None = None
) -> None:
    """Refuse an adaptive sweep the pool model cannot be fitted to within ``budget`` merges
    (``features``: the prior's, None without one)."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise SweepConfigError(
            f"sampling.budget={budget!r}: an adaptive sweep needs a budget, a positive integer "
            "(the most merges per method), e.g. {strategy: adaptive, budget: 60, seed: 0}."
        )
    below = [k for k in ks if k < num_experts]
    if len(below) < 2:
        raise SweepConfigError(
            f"sampling: strategy 'adaptive' fits the pool model, which tells each expert's effect "
            f"from the interactions only across two or more sizes below the pool's "
            f"{num_experts} experts; k has {len(below)}. Widen k (e.g. k: 1-{num_experts})."
        )
    needed = required_records(len(ks), num_experts, features=features)
    available = sum(math.comb(num_experts, k) for k in ks)
    if available < needed:
        raise SweepConfigError(
            f"sampling: strategy 'adaptive' needs {needed} merges per method to identify the pool "
            f"model of {num_experts} experts at {len(ks)} sizes, but k has only {available} "
            "subsets; use strategy: all."
        )
    if budget < needed:
        parts = (
            f"an effect per expert and {num_experts - 1} more"
            if features is None
            else f"the weight prior's {features} scales and an effect per expert"
        )
        raise SweepConfigError(
            f"sampling.budget={budget}: an adaptive sweep of {num_experts} experts at {len(ks)} "
            f"sizes needs {needed} merges per method before the pool model can choose any (a "
            f"curve level per size, {parts}); set budget to at least {needed}."
        )


def start_counts(
    num_experts: int, ks: Sequence[int], features: int | None = None
) -> dict[int, int]:
    """Subsets per size of the starting design: the pool model's minimum, dealt out one size at a
    time (smallest first) so every size gets its share, capped by its number of subsets (all of
    them, where the sizes hold fewer: :func:`check_adaptive` refuses such a sweep)."""
    counts = dict.fromkeys(sorted(ks), 0)
    short = required_records(len(ks), num_experts, features=features)
    while short > 0:
        open_sizes = [k for k in counts if counts[k] < math.comb(num_experts, k)][:short]
        if not open_sizes:
            break
        for k in open_sizes:
            counts[k] += 1
        short -= len(open_sizes)
    return counts


def start_design(
    experts: Sequence[str], ks: Sequence[int], seed: int, features: int | None = None
) -> list[tuple[str, ...]]:
    """The balanced design an adaptive sweep starts from, as subsets in pool order."""
    counts = start_counts(len(experts), ks, features)
    return [
        tuple(experts[i] for i in subset) for subset in balanced_design(len(experts), counts, seed)
    ]


def next_round(
    records: Iterable[Mapping[str, Any]],
    *,
    method: str,
    experts: Sequence[str],
    ks: Sequence[int],
    budget: int,
    count: int = 1,
    seed: int = 0,
    prior: EffectPrior | None = None,
) -> Round:
    """The next round of ``method``'s adaptive sweep from the records measured so far.

    Args:
        records: sweep records (any methods; those of ``method`` whose subsets lie in the pool
            and at the sweep's sizes count).
        experts: the pool, in its order; picks name experts in this order.
        ks: the sweep's sizes.
        budget: the method's merges at most, those already recorded included.
        count: subsets per round after the starting design (one per rank).
        seed: seeds the starting design, the candidate sample of large pools and the draws.
        prior: the method's effect prior (:func:`hf_mergelaw.priors.adaptive_prior`),
            over ``experts`` sorted; None fits without one.
    """
    ks = sorted({int(k) for k in ks})
    rows = _method_rows(records, method, experts, ks)
    merged = {frozenset(row["subset"]) for row in rows}
    room = budget - len(rows)
    if room <= 0:
        return Round(len(rows), (), f"budget spent: {len(rows)} merges (budget {budget})")
    features = None if prior is None else prior.size
    start = [s for s in start_design(experts, ks, seed, features) if frozenset(s) not in merged]
    if start:
        return Round(len(rows), tuple(start[:room]))
    model = fit_pool(_cross_domain(rows, experts), prior=prior)
    # Seeds the draws and the candidate sample; any integer seed, numpy wants one in [0, 2^32).
    round_seed = random.Random(f"adaptive-{seed}-{len(rows)}").getrandbits(32)
    # Below one merge per parameter the interactions rest on prior scales fitted to few merges,
    # which can shrink to zero, and with few residual degrees of freedom the misfit can fit to
    # zero: either makes every interval collapse and any answer look settled.
    can_settle = len(rows) >= model.theta.size and model.dof >= DOF_SETTLED
    settled = _settled(model, round_seed) if can_settle else None
    if settled:
        return Round(len(rows), (), f"settled after {len(rows)} merges: {settled}")
    candidates = candidate_subsets(model, round_seed)
    if candidates.shape[0] == 0:
        return Round(len(rows), (), f"every subset at k {_sizes(ks)} is merged ({len(rows)})")
    targets = answer_targets(model)
    picks = next_subsets(model, min(count, room), candidates=candidates, targets=targets)
    gain = picks[0].score / targets.shape[0]
    if can_settle and gain < SCORE_SETTLED:
        return Round(
            len(rows),
            (),
            f"settled after {len(rows)} merges: the most informative next merge would remove "
            f"{gain:.2%} of the answers' uncertainty on average (under {SCORE_SETTLED:.0%})",
        )
    order = {name: i for i, name in enumerate(experts)}
    return Round(len(rows), tuple(tuple(sorted(p.subset, key=order.__getitem__)) for p in picks))


@dataclass(frozen=True)
class Replay:
    """An adaptive sweep run in one process: its records, its rounds and why it stopped."""

    records: list[dict[str, Any]]
    rounds: list[Round]
    stop: str


def replay(
    measure: Callable[[tuple[tuple[str, ...], ...], int], list[dict[str, Any]]],
    *,
    method: str,
    experts: Sequence[str],
    ks: Sequence[int],
    budget: int,
    count: int = 1,
    seed: int = 0,
    prior: EffectPrior | None = None,
) -> Replay:
    """The rounds of :func:`next_round` with each round's merges done by ``measure`` (the picks
    and the number of merges so far -> their records): a synthetic pool, or a table of merges
    already measured, to try budgets and priors without merging (``sweep_pool`` runs the same
    rounds on merged models and the records on disk)."""
    records: list[dict[str, Any]] = []
    rounds: list[Round] = []
    while True:
        step = next_round(
            records,
            method=method,
            experts=experts,
            ks=ks,
            budget=budget,
            count=count,
            seed=seed,
            prior=prior,
        )
        if step.stop is not None:
            return Replay(records, rounds, step.stop)
        rounds.append(step)
        records += measure(step.picks, len(records))


def _method_rows(
    records: Iterable[Mapping[str, Any]], method: str, experts: Sequence[str], ks: Sequence[int]
) -> list[dict[str, Any]]:
    """The method's records in the pool and at the sweep's sizes, without their per-domain CEs
    (the design follows the cross-domain curve), in a canonical order: the fit, and so every
    pick, must not depend on the order in which ranks appended them."""
    pool, sizes = set(experts), set(ks)
    rows = [
        {key: value for key, value in record.items() if key != "per_domain"}
        for record in records
        if record.get("method") == method
        and set(record["subset"]) <= pool
        and len(record["subset"]) in sizes
    ]
    return sorted(rows, key=lambda row: (len(row["subset"]), sorted(row["subset"])))


def _cross_domain(rows: list[dict[str, Any]], experts: Sequence[str]) -> PoolRecords:
    """The method's cross-domain pool (the whole eval set's where it has no domains)."""
    groups = pool_records(rows, by=("method", "domain"), experts=experts)
    return next(g for g in groups if g.group["domain"] in (CROSS_DOMAIN, WHOLE_SET))


def _settled(model: PoolModel, seed: int) -> str | None:
    """Why the answers are settled (see the module docstring), or None while they are not."""
    sizes = [k for k in model.curve.ks if math.comb(model.m, k) > 1]
    best = select(model, sizes, top=1, draws=SELECT_DRAWS, seed=seed)
    lowest = min(s.p_best for s in best)
    if lowest < P_BEST_SETTLED:
        return None
    curve = pool_curve(model, list(model.curve.ks), seed=seed)
    means = [point.mean for point in curve]
    fall = max(means) - min(means)
    width = max((p.hi - p.lo) / 2 for p in curve if p.n_subsets > 1)
    if width > CURVE_SETTLED * fall:
        return None
    return (
        f"the best subset of every size has p_best >= {P_BEST_SETTLED} (lowest {lowest:.2f}) "
        f"and every pool-curve interval is within ±{width:.2g} nats ({width / fall:.1%} of the "
        f"curve's fall)"
    )


def _sizes(ks: Sequence[int]) -> str:
    return ", ".join(map(str, ks))
