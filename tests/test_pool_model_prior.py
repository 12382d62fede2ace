"""The pool model with an effect prior (hf_mergelaw.pool_model.prior): features known before any
merge, such as the experts' weight-space Gram, scaled by the fit and shrunk around; and the
adaptive sweeps that use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_mergelaw import priors
from hf_mergelaw.adaptive import check_adaptive, prior_features, start_design
from hf_mergelaw.adaptive import replay as adaptive_replay
from hf_mergelaw.cross_entropy import build_eval_set
from hf_mergelaw.errors import SweepConfigError
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.geometry import method_models
from hf_mergelaw.pool_model import (
    EffectPrior,
    PoolModel,
    PoolModelError,
    fit_pool,
    pool_curve,
    pool_records,
    required_records,
    select,
    synthetic_pool,
    weight_prior,
    within_k_r2,
)
from hf_mergelaw.pool_model.design import pairs
from hf_mergelaw.pool_model.geometry import GEOMETRY_FEATURES
from hf_mergelaw.pool_model.prior import priors_path, store_prior, stored_prior, unit_scale
from hf_mergelaw.pool_model.synthetic import SyntheticPool
from hf_mergelaw.priors import adaptive_prior, pool_curvature_prior, weight_gram
from hf_mergelaw.record_schema import CROSS_DOMAIN
from hf_mergelaw.subsets import sample_subsets
from hf_mergelaw.sweep_methods import MethodSpec
from tests.tiny_models import SENTENCES, save_family

M = 8
KS = range(1, M + 1)
GAMMA_SCALE = 0.04  # the true gamma per unit of the (unit-scaled) off-diagonal feature


def gram_of(seed: int, m: int = M) -> np.ndarray:
    """The Gram matrix of m random task vectors sharing a common direction (as fine-tunes of one
    base do), so pairs differ in how much they overlap."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((m, 40)) + 0.8 * rng.standard_normal(40)
    return vectors @ vectors.T


def gram_driven_pool(gram: np.ndarray, deviation_sd: float = 0.001) -> SyntheticPool:
    """A pool whose interactions follow the Gram's off-diagonal up to small deviations."""
    rng = np.random.default_rng(1)
    i, j = pairs(M)
    off = gram[i, j] / np.mean(np.abs(gram[i, j]))
    gamma = np.zeros((M, M))
    gamma[i, j] = gamma[j, i] = GAMMA_SCALE * off + rng.normal(0, deviation_sd, i.size)
    return SyntheticPool(
        experts=tuple(f"e{n:02d}" for n in range(M)),
        beta=rng.normal(0, 0.03, M),
        gamma=gamma,
        noise_sd=0.001,
    )


def balanced_records(pool: SyntheticPool, per_k: int, seed: int = 0) -> list[dict]:
    subsets = [
        s
        for k in range(1, M + 1)
        for s in sample_subsets(M, k, strategy="balanced", per_k=per_k, seed=seed)
    ]
    return pool.records(subsets, seed=seed)


def held_out_r2(pool: SyntheticPool, model: PoolModel) -> float:
    """R^2 of the within-k deviations over every subset of sizes 2..M-1 (noise-free truth)."""
    members = np.array([[(n >> e) & 1 for e in range(M)] for n in range(1, 2**M)], dtype=bool)
    members = members[(members.sum(axis=1) > 1) & (members.sum(axis=1) < M)]
    return within_k_r2(pool.true_ce(members), model.predict(members).mean, members.sum(axis=1))


def test_an_informative_prior_pins_the_interactions_from_fewer_merges() -> None:
    gram = gram_of(0)
    pool = gram_driven_pool(gram)
    prior = weight_prior(pool.experts, gram)
    few = pool_records(balanced_records(pool, per_k=3))[0]  # 22 merges: too few without a prior
    with pytest.raises(PoolModelError, match="needs at least 23"):
        fit_pool(few)
    with_prior = fit_pool(few, prior=prior)
    without = fit_pool(pool_records(balanced_records(pool, per_k=4))[0])  # 29 merges
    assert held_out_r2(pool, with_prior) > 0.99 > 0.95 > held_out_r2(pool, without)
    scales = with_prior.source["prior"]["scales"]
    assert scales["gamma ~ u_i . u_j"] == pytest.approx(GAMMA_SCALE, rel=0.1)
    assert with_prior.source["prior"]["kind"] == "weights"


def test_a_prior_that_predicts_nothing_costs_little() -> None:
    pool = synthetic_pool(M, seed=3, beta_sd=0.03, gamma_sd=0.01, noise_sd=0.001)
    records = pool_records(balanced_records(pool, per_k=4))[0]
    unrelated = weight_prior(pool.experts, gram_of(7))
    plain, primed = fit_pool(records), fit_pool(records, prior=unrelated)
    assert held_out_r2(pool, primed) > held_out_r2(pool, plain) - 0.02


def test_a_model_with_a_prior_answers_and_round_trips_like_any_other() -> None:
    gram = gram_of(0)
    pool = gram_driven_pool(gram)
    model = fit_pool(
        pool_records(balanced_records(pool, per_k=3))[0], prior=weight_prior(pool.experts, gram)
    )
    assert model.theta.size == model.curve.q + M + M * (M - 1) // 2  # folded: [curve, effects]
    prediction = model.predict([("e00", "e03"), ("e01", "e02", "e05")])
    assert np.all(prediction.lo < prediction.mean) and np.all(prediction.mean < prediction.hi)
    assert {s.k for s in select(model, [2, 4], top=1, draws=200)} >= {2, 4}
    assert len(pool_curve(model)) == M
    again = PoolModel.from_dict(model.to_dict())
    assert again.source == model.source
    np.testing.assert_allclose(again.predict(prediction.members).mean, prediction.mean)


def test_records_too_few_for_a_prior_say_how_many_more() -> None:
    pool = gram_driven_pool(gram_of(0))
    prior = weight_prior(pool.experts, gram_of(0))
    subsets = [(i,) for i in range(M)] + [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1, 2, 3)]
    records = pool_records(pool.records(subsets))[0]
    with pytest.raises(PoolModelError, match=r"needs at least 14 .* prior's 3 scales .* Merge 1"):
        fit_pool(records, prior=prior)


@pytest.mark.parametrize(
    ("experts", "gram", "message"),
    [
        (("a", "b", "c"), np.eye(2), r"Gram matrix of 3 experts is \(3, 3\); got \(2, 2\)"),
        (("a", "b"), np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN or infinity"),
    ],
)
def test_a_bad_gram_is_refused(experts, gram, message) -> None:
    with pytest.raises(PoolModelError, match=message):
        weight_prior(experts, gram)


def test_a_prior_over_another_pool_is_refused() -> None:
    pool = gram_driven_pool(gram_of(0))
    records = pool_records(balanced_records(pool, per_k=3))[0]
    other = weight_prior([f"x{n}" for n in range(M)], gram_of(0))
    with pytest.raises(
        PoolModelError, match=r"prior is over x0, .* compute the prior for the same"
    ):
        fit_pool(records, prior=other)


def test_features_of_the_wrong_width_are_refused() -> None:
    with pytest.raises(PoolModelError, match="one feature row of 3 values per name"):
        EffectPrior(("a", "b"), np.zeros((1, 4)), ("f",), "custom")


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> ExpertPool:
    base, experts = save_family(tmp_path_factory.mktemp("family"), num_experts=3, noise=0.01)
    return ExpertPool(base, experts, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("slice_size", [1 << 22, 1000])  # one slice per tensor, and many
@pytest.mark.parametrize("config", [{"name": "average"}, {"name": "ties", "density": 0.5}])
def test_the_weight_gram_is_that_of_the_vectors_the_method_adds(
    tiny_pool, config, slice_size, monkeypatch
) -> None:
    monkeypatch.setattr(priors, "GRAM_SLICE", slice_size)
    method = MethodSpec.from_config(config)
    names = sorted(tiny_pool.names)
    flat = torch.stack(
        [
            torch.cat(
                [tiny_pool.merged_vector(method, e, t).flatten() for t in tiny_pool.parameters]
            )
            for e in names
        ]
    ).double()
    np.testing.assert_allclose(
        weight_gram(tiny_pool, method, names), (flat @ flat.T).numpy(), rtol=1e-6
    )
    weights = adaptive_prior(tiny_pool, method, "weights")
    if method.elects_signs:  # its vectors do not add: the sweep fits it without this prior
        assert weights is None and prior_features("weights", [method]) is None
    else:
        assert weights.experts == tuple(names) and prior_features("weights", [method]) == 3


def test_the_curvature_prior_is_the_pool_geometrys_second_order_effects(tiny_pool) -> None:
    texts = list(SENTENCES) * 2
    eval_set = build_eval_set(
        tiny_pool.base_path, texts=texts, domains=["ab"[i % 2] for i in range(len(texts))]
    )
    method = MethodSpec.from_config({"name": "average"})
    prior = pool_curvature_prior(tiny_pool, eval_set, method, batch_size=4, curvature_sample=1.0)
    models = method_models(tiny_pool, eval_set, method, "hessian", 4, 0.9)
    macro = next(m for m in models if m.group["domain"] == CROSS_DOMAIN)
    m = len(tiny_pool.names)
    beta, gamma = macro.theta[2 : 2 + m], macro.theta[2 + m :]
    assert prior.names == GEOMETRY_FEATURES and prior.kind == "curvature"
    np.testing.assert_allclose(prior.features[0, :m] * unit_scale(beta), beta, rtol=1e-6)
    np.testing.assert_allclose(prior.features[1, m:] * unit_scale(gamma), gamma, rtol=1e-6)
    assert adaptive_prior(tiny_pool, method, "curvature", eval_set).size == 2


def test_adaptive_sweeps_fit_without_a_prior_when_asked_or_when_mergekit_merges(tiny_pool):
    fused, stock = (
        MethodSpec.from_config({"name": "average"}),
        MethodSpec.from_config({"name": "slerp", "t": 0.5}),
    )
    assert adaptive_prior(tiny_pool, fused, "none") is None
    assert adaptive_prior(tiny_pool, stock, "weights") is None
    assert prior_features("weights", [fused]) == 3
    assert prior_features("curvature", [fused]) == 2
    assert prior_features("weights", [fused, stock]) is None
    assert prior_features("none", [fused]) is None


def replay(pool: SyntheticPool, budget: int, prior: EffectPrior | None) -> list[dict]:
    """An adaptive sweep of the synthetic pool (one pick per round) to its budget."""
    index = {name: i for i, name in enumerate(pool.experts)}

    def measure(picks: tuple[tuple[str, ...], ...], merged: int) -> list[dict]:
        return pool.records([sorted(index[name] for name in s) for s in picks], seed=merged)

    run = adaptive_replay(
        measure, method="average", experts=pool.experts, ks=KS, budget=budget, prior=prior
    )
    return run.records


def test_an_adaptive_sweep_with_the_prior_starts_smaller_and_learns_more_per_merge() -> None:
    gram = gram_of(0)
    pool = gram_driven_pool(gram)
    prior = weight_prior(pool.experts, gram)
    start = start_design(pool.experts, KS, seed=0, features=prior.size)
    assert len(start) == required_records(M, M, features=3) == M + 3 + M
    budget = 24
    primed = replay(pool, budget, prior)
    assert len(primed) == budget
    models = [fit_pool(pool_records(primed)[0], prior=prior)]
    models.append(fit_pool(pool_records(replay(pool, budget, None))[0]))
    assert held_out_r2(pool, models[0]) > 0.99 > 0.95 > held_out_r2(pool, models[1])


def test_the_budget_an_adaptive_sweep_with_the_prior_needs_is_named() -> None:
    with pytest.raises(SweepConfigError, match=r"needs 19 merges .* weight prior's 3 scales"):
        check_adaptive(M, list(KS), 18, features=3)
    check_adaptive(M, list(KS), 19, features=3)


def test_a_kept_prior_comes_back_exactly_and_only_for_its_kind_and_pool(tmp_path) -> None:
    records = tmp_path / "results.jsonl"
    prior = weight_prior([f"e{n}" for n in range(4)], gram_of(2, m=4))
    assert stored_prior(records, "average", "weights", prior.experts) is None  # nothing kept
    store_prior(records, "average", prior)
    store_prior(records, "ties", weight_prior(prior.experts, gram_of(3, m=4)))
    back = stored_prior(records, "average", "weights", prior.experts)
    assert back.names == prior.names and np.array_equal(back.features, prior.features)
    assert stored_prior(records, "average", "curvature", prior.experts) is None
    assert stored_prior(records, "average", "weights", ("e0", "e1", "e2", "x")) is None
    assert priors_path(records).name == "results.priors.json"
