"""Second-order terms along task vectors (hf_mergelaw.curvature), checked against exact answers.

A quadratic loss is reproduced exactly by its second-order expansion; on a tiny random Llama the
terms match finite differences (in float64), the Gauss-Newton matrix matches its closed form for
cross-entropy, and the loss matches the ``cross_entropy`` metric domain by domain.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaForCausalLM

from hf_mergelaw.cross_entropy import (
    EvalSet,
    _pad_batch,
    build_eval_set,
    cross_entropy,
)
from hf_mergelaw.curvature import CURVATURES, SecondOrder, lm_second_order, second_order
from hf_mergelaw.errors import UserError
from hf_mergelaw.testing import tiny_llama_config, word_tokenizer

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat sat",
    "def add ( a , b ) : return a + b",
    "for i in range ( n ) : total = total + i",
    "two plus two is four and four plus four is eight",
    "the dog sat",
    "return a",
]
DOMAINS = ["prose", "prose", "code", "code", "math", "prose", "code"]
PROMPTS = ["the cat", "def add ( a , b ) :", "two plus two", "a dog ran"]
RESPONSES = [" sat on the mat", " return a + b", " is four", " in the park"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(TEXTS + PROMPTS + RESPONSES)


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).eval()


@pytest.fixture(scope="module")
def eval_set(tokenizer) -> EvalSet:
    return build_eval_set(tokenizer, texts=TEXTS, domains=DOMAINS)


def random_directions(model, count: int, scale: float = 0.02, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            name: scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for name, p in model.named_parameters()
        }
        for _ in range(count)
    ]


def predicted(terms: SecondOrder, c: np.ndarray) -> float:
    return terms.loss + c @ terms.gradient + c @ terms.curvature @ c / 2


# --- a loss that is exactly quadratic: linear regression with mean squared error ---------------


@pytest.fixture(scope="module")
def regression():
    """y = X w + b in float64, the mean squared error over 12 rows split in three batches."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(4, 2).double()
    x = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(12, 2, generator=generator, dtype=torch.float64)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]

    def outputs(params, batch):
        return functional_call(linear, params, (batch[0],))

    def mse(prediction, batch):
        return ((prediction - batch[1]) ** 2).sum() / y.numel()

    params = {name: p.detach().clone() for name, p in linear.named_parameters()}
    directions = [
        {
            name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for name, p in params.items()
        }
        for _ in range(3)
    ]
    directions.append({"bias": torch.randn(2, generator=generator, dtype=torch.float64)})
    return outputs, mse, params, directions, batches


def regression_loss(regression, c) -> float:
    """The loss measured at theta_0 + sum_i c_i u_i."""
    outputs, mse, params, directions, batches = regression
    moved = {name: p.clone() for name, p in params.items()}
    for weight, direction in zip(c, directions, strict=True):
        for name, tensor in direction.items():
            moved[name] += weight * tensor
    return sum(float(mse(outputs(moved, batch), batch)) for batch in batches)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_the_expansion_of_a_quadratic_loss_is_exact_for_every_merge(regression, curvature) -> None:
    outputs, mse, params, directions, batches = regression
    terms = second_order(outputs, mse, params, directions, batches, curvature=curvature)
    assert terms.gradient.shape == (4,) and terms.curvature.shape == (4, 4)
    np.testing.assert_array_equal(terms.curvature, terms.curvature.T)
    assert terms.loss == pytest.approx(regression_loss(regression, np.zeros(4)), rel=1e-12)
    for k in (1, 2, 3, 4):
        for subset in itertools.combinations(range(4), k):
            c = np.zeros(4)
            c[list(subset)] = 1 / k  # the average merge of the subset
            assert predicted(terms, c) == pytest.approx(regression_loss(regression, c), rel=1e-10)
    c = np.array([0.7, -1.3, 2.0, 0.4])  # any weights, not only averages
    assert predicted(terms, c) == pytest.approx(regression_loss(regression, c), rel=1e-10)


def test_the_gauss_newton_matrix_is_the_hessian_of_a_linear_model_under_mse(regression) -> None:
    exact = second_order(*regression, curvature="hessian")
    ggn = second_order(*regression, curvature="ggn")
    np.testing.assert_allclose(ggn.curvature, exact.curvature, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ggn.gradient, exact.gradient, rtol=1e-12)
    assert ggn.loss == pytest.approx(exact.loss, rel=1e-14)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_a_loss_linear_in_the_weights_has_no_curvature(curvature) -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    params = {"w": torch.tensor([0.5, -0.25], dtype=torch.float64)}
    directions = [{"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}, {"w": torch.ones(2)}]
    terms = second_order(
        lambda p, batch: batch @ p["w"],
        lambda z, batch: z.sum(),
        params,
        directions,
        [x],
        curvature=curvature,
    )
    assert terms.loss == pytest.approx(float((x @ params["w"]).sum()))
    np.testing.assert_allclose(terms.gradient, [4.0, 5.0])
    np.testing.assert_array_equal(terms.curvature, np.zeros((2, 2)))


# --- a tiny Llama in float64, against finite differences ----------------------------------------


@pytest.fixture(scope="module")
def llama64(model, eval_set):
    """The generic function's view of the tiny Llama's mean CE, in float64 (but for the RMSNorm
    and rotary parts, which Llama computes in float32).

    SDPA's math backend rather than eager attention, whose softmax is float32: it is twice
    differentiable, forward-mode too, and keeps float64.
    """
    double = copy.deepcopy(model).double()
    batches = [
        _pad_batch(eval_set, i, min(i + 3, len(eval_set)), "cpu")
        for i in range(0, len(eval_set), 3)
    ]

    def outputs(params, batch):
        inputs = dict(input_ids=batch[0], attention_mask=batch[2], use_cache=False)
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(double, params, (), inputs).logits

    def mean_ce(logits, batch):
        # Not _summed_token_losses: it takes the log-softmax in float32, as the metric does.
        scored = batch[1][:, 1:] != -100
        picked = logits[:, :-1][scored]
        return (
            F.cross_entropy(picked, batch[1][:, 1:][scored], reduction="sum") / eval_set.num_tokens
        )

    params = {name: p.detach() for name, p in double.named_parameters()}
    directions = [
        {name: t.double() for name, t in d.items()} for d in random_directions(model, 3, 0.05)
    ]
    # One direction touches only the MLPs: the names it leaves out count as zero.
    directions.append({n: t for n, t in directions[0].items() if ".mlp." in n})
    return outputs, mean_ce, params, directions, batches


def shifted(params, direction, step):
    return {name: p + step * direction.get(name, 0) for name, p in params.items()}


def derivative(f, step: float = 1e-2):
    """f'(0) by central differences with one Richardson step (error O(step^4)): Llama keeps
    RMSNorm and rotary in float32, whose rounding noise swamps smaller steps."""
    central = [(f(h) - f(-h)) / (2 * h) for h in (step, step / 2)]
    return (4 * central[1] - central[0]) / 3


def test_the_gradient_and_hessian_match_central_differences(llama64) -> None:
    outputs, mean_ce, params, directions, batches = llama64
    terms = second_order(outputs, mean_ce, params, directions, batches)
    scale = np.abs(terms.curvature).max()
    for j, direction in enumerate(directions):

        def along(h, direction=direction):
            return second_order(
                outputs, mean_ce, shifted(params, direction, h), directions, batches
            )

        # g_j is the derivative of the loss along u_j; column j of Q that of the gradient.
        assert terms.gradient[j] == pytest.approx(derivative(lambda h: along(h).loss), rel=1e-4)
        np.testing.assert_allclose(
            terms.curvature[:, j],
            derivative(lambda h: along(h).gradient),
            rtol=1e-4,
            atol=1e-5 * scale,
        )


def test_the_gauss_newton_matrix_matches_its_closed_form_for_cross_entropy(llama64) -> None:
    """(J u)' H_out (J v) = sum_t E_p[a_t b_t] - E_p[a_t] E_p[b_t], a_t and b_t the logit
    tangents (here by central differences) at scored token t, over the mean's token count."""
    outputs, mean_ce, params, directions, batches = llama64
    ggn = second_order(outputs, mean_ce, params, directions, batches, curvature="ggn")
    expected = np.zeros((len(directions), len(directions)))
    num_tokens = sum(int((batch[1][:, 1:] != -100).sum()) for batch in batches)
    for batch in batches:
        scored = batch[1][:, 1:] != -100
        probs = outputs(params, batch)[:, :-1][scored].softmax(-1)
        tangents = [
            derivative(
                lambda h, d=d, b=batch, s=scored: outputs(shifted(params, d, h), b)[:, :-1][s]
            )
            for d in directions
        ]
        for i, j in itertools.product(range(len(directions)), repeat=2):
            a, b = tangents[i], tangents[j]
            covariance = (probs * a * b).sum(-1) - (probs * a).sum(-1) * (probs * b).sum(-1)
            expected[i, j] += float(covariance.sum()) / num_tokens
    np.testing.assert_allclose(ggn.curvature, expected, rtol=1e-4, atol=1e-5 * expected.max())


def test_the_gauss_newton_matrix_of_a_language_model_is_psd_and_not_the_hessian(llama64) -> None:
    exact = second_order(*llama64, curvature="hessian")
    ggn = second_order(*llama64, curvature="ggn")
    # Same loss and first derivative (forward- and reverse-mode round Llama's float32 parts
    # differently): only the curvature's residual term differs.
    assert ggn.loss == pytest.approx(exact.loss, rel=1e-12)
    np.testing.assert_allclose(ggn.gradient, exact.gradient, rtol=1e-6)
    eigenvalues = np.linalg.eigvalsh(ggn.curvature)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max()
    assert np.abs(ggn.curvature - exact.curvature).max() > 1e-2 * np.abs(exact.curvature).max()


# --- lm_second_order: the metric's loss, per domain, float32 ------------------------------------


@pytest.mark.parametrize("curvature", CURVATURES)
def test_the_float32_terms_agree_with_float64(model, eval_set, llama64, curvature) -> None:
    outputs, mean_ce, params, directions, batches = llama64
    reference = second_order(outputs, mean_ce, params, directions, batches, curvature=curvature)
    whole = EvalSet(eval_set.input_ids, eval_set.labels, domains=None)
    float32 = [{n: t.float() for n, t in d.items()} for d in directions]
    terms = lm_second_order(model, whole, float32, curvature=curvature, batch_size=3)["all"]
    assert terms.loss == pytest.approx(reference.loss, rel=1e-6)
    np.testing.assert_allclose(terms.gradient, reference.gradient, rtol=1e-4)
    scale = np.abs(reference.curvature).max()
    np.testing.assert_allclose(terms.curvature, reference.curvature, rtol=1e-3, atol=1e-4 * scale)


def test_each_domains_loss_is_the_metrics_cross_entropy(model, eval_set) -> None:
    terms = lm_second_order(model, eval_set, random_directions(model, 2))
    metric = cross_entropy(model, eval_set)
    assert list(terms) == ["code", "math", "prose"]
    for domain, value in metric.per_domain.items():
        assert terms[domain].loss == pytest.approx(value.cross_entropy, rel=1e-6)
        assert terms[domain].num_tokens == value.num_tokens


def test_without_domains_the_whole_set_is_one_loss_under_all(model, tokenizer) -> None:
    eval_set = build_eval_set(tokenizer, texts=TEXTS)
    terms = lm_second_order(model, eval_set, random_directions(model, 2), curvature="ggn")
    metric = cross_entropy(model, eval_set)
    assert list(terms) == ["all"]
    assert terms["all"].loss == pytest.approx(metric.cross_entropy, rel=1e-6)
    assert terms["all"].num_tokens == metric.num_tokens


@pytest.mark.parametrize("curvature", CURVATURES)
def test_prompt_response_sets_score_only_the_responses(model, tokenizer, curvature) -> None:
    eval_set = build_eval_set(
        tokenizer, prompts=PROMPTS, responses=RESPONSES, domains=["a", "b", "b", "a"]
    )
    terms = lm_second_order(model, eval_set, random_directions(model, 2), curvature=curvature)
    metric = cross_entropy(model, eval_set)
    for domain, value in metric.per_domain.items():
        assert terms[domain].loss == pytest.approx(value.cross_entropy, rel=1e-6)
        assert (
            terms[domain].num_tokens
            == value.num_tokens
            < sum(
                len(ids) - 1
                for ids, d in zip(eval_set.input_ids, eval_set.domains, strict=True)
                if d == domain
            )
        )


@pytest.mark.parametrize("curvature", CURVATURES)
def test_batch_size_changes_nothing_but_rounding(model, eval_set, curvature) -> None:
    directions = random_directions(model, 3)
    runs = [
        lm_second_order(model, eval_set, directions, curvature=curvature, batch_size=size)
        for size in (1, 3, len(eval_set))
    ]
    for run in runs[1:]:
        for domain, terms in run.items():
            first = runs[0][domain]
            assert terms.loss == pytest.approx(first.loss, rel=1e-6)
            np.testing.assert_allclose(terms.gradient, first.gradient, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(terms.curvature, first.curvature, rtol=1e-4, atol=1e-8)


def test_a_curvature_sample_takes_the_curvature_from_some_sequences_and_the_rest_from_all(
    model, tokenizer, eval_set
) -> None:
    directions = random_directions(model, 2)
    full = lm_second_order(model, eval_set, directions)
    sampled = lm_second_order(model, eval_set, directions, curvature_sample=0.5)
    prose = [t for t, d in zip(TEXTS, DOMAINS, strict=True) if d == "prose"]
    # The prose sequences sorted longest first, every other one from the first: the sample.
    longest_first = sorted(prose, key=lambda t: -len(tokenizer(t)["input_ids"]))
    alone = build_eval_set(tokenizer, texts=longest_first[::2])
    curved_alone = lm_second_order(model, alone, directions)["all"].curvature
    assert sampled["prose"].loss == pytest.approx(full["prose"].loss, rel=1e-6)
    np.testing.assert_allclose(sampled["prose"].gradient, full["prose"].gradient, rtol=1e-5)
    np.testing.assert_allclose(sampled["prose"].curvature, curved_alone, rtol=1e-4, atol=1e-8)
    assert not np.allclose(sampled["prose"].curvature, full["prose"].curvature, rtol=1e-3)
    with pytest.raises(UserError, match="curvature_sample=0"):
        lm_second_order(model, eval_set, directions, curvature_sample=0)


def test_the_model_is_left_as_it_was(tokenizer, eval_set) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).train()
    attention = model.config._attn_implementation
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    for curvature in CURVATURES:
        lm_second_order(model, eval_set, random_directions(model, 2), curvature=curvature)
    assert model.training and model.config._attn_implementation == attention == "sdpa"
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


# --- refusals --------------------------------------------------------------------------------


def test_a_direction_of_the_wrong_shape_is_refused(model, eval_set) -> None:
    directions = random_directions(model, 2)
    directions[1]["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(
        UserError, match=r"direction 1's tensor 'lm_head.weight' has shape \(3, 3\)"
    ):
        lm_second_order(model, eval_set, directions)


def test_a_direction_naming_a_tensor_the_model_lacks_is_refused(model, eval_set) -> None:
    with pytest.raises(
        UserError, match=r"direction 0 names tensor 'lm_head\.bias', which the base"
    ):
        lm_second_order(model, eval_set, [{"lm_head.bias": torch.zeros(1)}])


def test_no_directions_or_only_empty_ones_are_refused(model, eval_set) -> None:
    with pytest.raises(UserError, match="No directions given"):
        lm_second_order(model, eval_set, [])
    with pytest.raises(UserError, match="Every direction is empty"):
        lm_second_order(model, eval_set, [{}, {}])


def test_an_empty_eval_set_or_no_batches_is_refused(model, regression) -> None:
    with pytest.raises(UserError, match="no tokens to score"):
        lm_second_order(model, EvalSet((), (), None), random_directions(model, 1))
    outputs, mse, params, directions, _ = regression
    with pytest.raises(UserError, match="No batches"):
        second_order(outputs, mse, params, directions, [])


def test_a_model_not_in_float32_is_refused(model, eval_set) -> None:
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(UserError, match=r"torch\.bfloat16 parameters; load the base in float32"):
        lm_second_order(half, eval_set, random_directions(half, 1))


def test_an_unknown_curvature_or_batch_size_is_refused(model, eval_set, regression) -> None:
    with pytest.raises(UserError, match="curvature='fisher' is not one of hessian, ggn"):
        lm_second_order(model, eval_set, random_directions(model, 1), curvature="fisher")
    with pytest.raises(UserError, match="curvature='hess' is not one of hessian, ggn"):
        second_order(*regression, curvature="hess")
    with pytest.raises(UserError, match="batch_size must be at least 1"):
        lm_second_order(model, eval_set, random_directions(model, 1), batch_size=0)
