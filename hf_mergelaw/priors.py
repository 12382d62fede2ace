"""The pool model's priors from a pool (:mod:`hf_mergelaw.pool_model.prior`), known before any
merge: the Gram matrix of the vectors a method adds (one pass over the weights, no forward pass),
or the second-order terms of the loss along them (a gradient and M curvature-vector products on a
share of the eval data)::

    method = MethodSpec.from_config({"name": "average"})
    prior = pool_weight_prior(pool, method)                      # "weights"
    prior = pool_curvature_prior(pool, eval_set, method)          # "curvature"
    fit_pool(records, prior=prior)

For TIES-family methods the vectors are the trimmed ones each expert brings before the subset's
sign election, so either prior is rougher there: an adaptive sweep takes only the curvature's
for them, and none for methods mergekit runs itself, which are not sums of per-expert vectors
(:func:`hf_mergelaw.adaptive.has_prior`).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel

from .adaptive import has_prior
from .cross_entropy import EvalSet
from .curvature import lm_second_order
from .experts import ExpertPool
from .pool_model import EffectPrior, PoolGeometry, weight_prior
from .record_schema import CROSS_DOMAIN, WHOLE_SET
from .sweep_methods import MethodSpec

# Share of each domain's sequences the curvature prior is taken from: on the demo pool an eighth
# kept the zero-merge shape R^2 at 0.99 for a fifth of the cost (pool_geometry results).
CURVATURE_SAMPLE = 0.125
GRAM_SLICE = 1 << 22  # entries per expert in one float64 product of the Gram


@torch.no_grad()
def weight_gram(pool: ExpertPool, method: MethodSpec, experts: list[str]) -> np.ndarray:
    """``G[i, j] = u_i . u_j`` over every tensor, the ``u_i`` the vectors ``method`` adds for
    ``experts`` (in that order), summed in float64 a slice at a time: memory beyond the pool's
    is one tensor's M vectors and one float64 slice of them (a 7B embedding's M vectors in
    float64 would be tens of GB)."""
    gram = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for name in pool.parameters:
        if all(name in pool.experts[e].same_as_base for e in experts):
            continue
        vectors = [pool.merged_vector(method, e, name).flatten() for e in experts]
        for start in range(0, vectors[0].numel(), GRAM_SLICE):
            part = torch.stack([v[start : start + GRAM_SLICE] for v in vectors]).double()
            gram += (part @ part.T).cpu()
    return gram.numpy()


def pool_weight_prior(pool: ExpertPool, method: MethodSpec) -> EffectPrior:
    """The weight-space prior of ``method``'s pool model, over the experts in sorted order (as
    pool records sort them)."""
    experts = sorted(pool.names)
    return weight_prior(experts, weight_gram(pool, method, experts))


def pool_curvature_prior(
    pool: ExpertPool,
    eval_set: EvalSet,
    method: MethodSpec,
    *,
    batch_size: int = 8,
    curvature_sample: float = CURVATURE_SAMPLE,
) -> EffectPrior:
    """The second-order prior of ``method``'s cross-domain pool model: the Hessian terms along
    the method's vectors from ``curvature_sample`` of each domain's sequences, averaged over the
    domains as the cross-domain CE averages them."""
    geometries = method_geometries(
        pool, eval_set, method, batch_size=batch_size, curvature_sample=curvature_sample
    )
    return geometries.get(CROSS_DOMAIN, geometries.get(WHOLE_SET)).effect_prior()


def method_geometries(
    pool: ExpertPool,
    eval_set: EvalSet,
    method: MethodSpec,
    *,
    curvature: str = "hessian",
    batch_size: int = 8,
    curvature_sample: float = 1.0,
    base: PreTrainedModel | None = None,
) -> dict[str, PoolGeometry]:
    """Each domain's second-order terms along ``method``'s vectors (over the experts sorted),
    and the cross-domain mean of them (``CROSS_DOMAIN``; an eval set without domains has the
    ``WHOLE_SET`` alone); ``base``: the float32 base when the caller holds it already."""
    experts = tuple(sorted(pool.names))
    terms = lm_second_order(
        float32_base(pool) if base is None else base,
        eval_set,
        [method_directions(pool, method, name) for name in experts],
        curvature=curvature,
        batch_size=batch_size,
        curvature_sample=curvature_sample,
    )
    geometries = {
        domain: PoolGeometry(experts, t.loss, t.gradient, t.curvature)
        for domain, t in terms.items()
    }
    if WHOLE_SET not in geometries:
        geometries[CROSS_DOMAIN] = PoolGeometry.mean(list(geometries.values()))
    return geometries


def adaptive_prior(
    pool: ExpertPool,
    method: MethodSpec,
    kind: str,
    eval_set: EvalSet | None = None,
    batch_size: int = 8,
) -> EffectPrior | None:
    """The prior an adaptive sweep fits ``method``'s pool model with (``kind``: the sweep's
    ``sampling.prior``; ``eval_set``: the sweep's, which the curvature prior needs), None where
    it has none (:func:`~.adaptive.has_prior`)."""
    if not has_prior(kind, method):
        return None
    if kind == "weights":
        return pool_weight_prior(pool, method)
    if eval_set is None:
        raise ValueError("the curvature prior needs the eval set")
    return pool_curvature_prior(pool, eval_set, method, batch_size=batch_size)


def method_directions(pool: ExpertPool, method: MethodSpec, expert: str) -> dict[str, torch.Tensor]:
    """The float32 vector ``method`` adds for ``expert`` (times k), tensors it leaves alone
    omitted. The pool's own task vectors where they are that already (a float32 pool's average),
    else one float32 copy per expert: memory beyond the pool's is O(M x model) at most."""
    untouched = pool.experts[expert].same_as_base
    return {
        name: pool.merged_vector(method, expert, name).float()
        for name in pool.parameters
        if name not in untouched
    }


def float32_base(pool: ExpertPool) -> PreTrainedModel:
    """The base in float32 for derivatives: the pool's own model when it merges in float32,
    else a float32 copy (second derivatives in bf16 keep ~3 significant digits)."""
    if pool.dtype == torch.float32:
        pool.restore_base()
        return pool.model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pool.base_path, dtype=torch.float32)
    return model.to(pool.device).eval()
