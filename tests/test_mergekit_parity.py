"""The fused mergekit methods behave as mergekit 0.1.5's, where its own tests look.

float64 inputs, inputs that require grad (values and gradients), weights that bf16 cannot hold
exactly (rounded as mergekit rounds them, so the sign votes agree), `rescale: true` for TIES,
0-dim and strided tensors, density 0, and the rest of the family (task arithmetic, Breadcrumbs).
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

import mergekit_plugins  # noqa: F401  (registers the fused methods)
import triton_ops

NON_DYADIC = [0.3, 0.7, 0.2, 0.45]


def merged(method: str, tensors: list[torch.Tensor], **parameters: object) -> torch.Tensor:
    return merge_tensors(tensors, method, parameters=parameters, base_index=0, name="w")


def problem(
    shape: tuple[int, ...], k: int, dtype: torch.dtype, seed: int, *, delta: float = 0.05
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
    experts = [base + delta * torch.randn(shape, generator=generator, dtype=torch.float64)]
    experts += [base + delta * torch.randn(shape, generator=generator, dtype=torch.float64)]
    experts += [
        base + delta * torch.randn(shape, generator=generator, dtype=torch.float64)
        for _ in range(k - 2)
    ]
    return [t.to(dtype) for t in (base, *experts)]


# --- weights mergekit cannot hold exactly ------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_bf16_non_dyadic_weights_make_mergekits_sign_decisions(method: str) -> None:
    # Deltas of 0.1 on a base of 0.1: an entry whose vote went the other way moves by about a
    # delta; the arithmetic (fp32 accumulation against mergekit's bf16 steps) by a few bf16
    # ulps of the summands, below 0.01.
    tensors = problem((64, 257), 4, torch.bfloat16, seed=1, delta=0.1)
    options = {"weight": NON_DYADIC, "density": 1.0, "normalize": True, "gamma": 0.0}
    if method == "ties":
        del options["gamma"]
    stock = merged(method, tensors, **options)
    fused = merged(f"{method}_fused", tensors, **options)
    assert float((fused.double() - stock.double()).abs().max()) < 0.01


def test_exact_weights_can_vote_otherwise_which_the_rounding_avoids() -> None:
    # triton_ops itself keeps the weights exact (its documented API); with the same bf16 inputs
    # some near-zero votes then go the other way than mergekit's. This is what the mergekit
    # methods' rounding prevents (the test above), and shows that test can fail.
    base, *experts = problem((64, 257), 4, torch.bfloat16, seed=1, delta=0.1)
    stock = merged("ties", [base, *experts], weight=NON_DYADIC, density=1.0)
    exact = triton_ops.ties_merge(base, experts, weights=NON_DYADIC, densities=[1.0] * 4)
    assert float((exact.double() - stock.double()).abs().max()) > 0.05


# --- float64 and autograd ------------------------------------------------------------------------

FAMILY = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("method", FAMILY)
def test_float64_values_and_gradients_equal_mergekits(method: str, rescale: bool) -> None:
    generator = torch.Generator().manual_seed(42)
    inputs = [torch.randn(4, 9, generator=generator, dtype=torch.float64) for _ in range(4)]
    options = dict(
        weight=[0.7, -0.2, 0.5], density=0.6, normalize=True, rescale=rescale, **{"lambda": 0.8}
    )
    results = {}
    for name in (method, f"{method}_fused"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = merged(name, leaves, **options)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results[name] = (out.detach(), grads)
    (stock, stock_grads), (fused, fused_grads) = results.values()
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, stock)
    for got, expected in zip(fused_grads, stock_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_grad_of_dare_flows_through_the_kept_entries_only() -> None:
    # The masks differ from mergekit's by design; the gradient of the fused merge with respect
    # to an expert is its factor where the entry was kept and zero where it was dropped.
    base, expert = torch.zeros(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    expert.requires_grad_()
    out = triton_ops.dare_merge(base, [expert], weights=[0.5], densities=[0.3], rescale=None)
    (grad,) = torch.autograd.grad(out.sum(), [expert])
    kept = out.detach() != 0
    assert torch.equal(grad[kept], torch.full_like(grad[kept], 0.5))
    assert not grad[~kept].any()


# --- TIES with rescale, shapes, density 0 ------------------------------------------------------


def test_ties_rescale_matches_mergekit_in_fp32() -> None:
    tensors = problem((33, 501), 3, torch.float32, seed=5)
    options = {"weight": [0.5, 1.0, 0.25], "density": [0.3, 0.6, 0.9], "rescale": True}
    stock = merged("ties", tensors, **options)
    fused = merged("ties_fused", tensors, **options)
    torch.testing.assert_close(fused, stock, rtol=1e-6, atol=1e-6)
    without = merged("ties_fused", tensors, **{**options, "rescale": False})
    assert not torch.allclose(without, stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_single_element_tensors_and_density_zero_merge_as_mergekits(shape, density) -> None:
    base, other = torch.zeros(shape), torch.ones(shape)
    # DARE's draws are not mergekit's: compared where its keep decision is certain.
    methods = ("ties", "breadcrumbs") + (("dare_linear",) if density in (0.0, 1.0) else ())
    for method in methods:
        options = {"weight": 1.0, "density": density}
        fused = merged(f"{method}_fused", [base, other], **options)
        stock = merged(method, [base, other], **options)
        assert fused.shape == shape
        torch.testing.assert_close(fused, stock, msg=f"{method} density {density}")


def test_strided_inputs_merge_like_their_contiguous_copies() -> None:
    tensors = problem((101, 37), 3, torch.float32, seed=6)
    strided = [t.t() for t in tensors]
    options = {"weight": [0.5, 0.25, 1.0], "density": 0.4}
    expected = merged("ties_fused", [t.contiguous() for t in strided], **options)
    torch.testing.assert_close(merged("ties_fused", strided, **options), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["task_arithmetic", "breadcrumbs", "breadcrumbs_ties"])
def test_rest_of_the_family_matches_mergekit_in_fp32(method: str) -> None:
    # Distinct magnitudes (gaussian fp32): no ties at the trim bounds, so the kept sets agree.
    tensors = problem((41, 613), 4, torch.float32, seed=7)
    options = {"weight": [0.5, 0.75, 1.0, -0.25], "density": [0.9, 0.5, 0.3, 1.0], "gamma": 0.05}
    if method == "task_arithmetic":
        options = {"weight": options["weight"], "normalize": True, "lambda": 0.8}
    stock = merged(method, tensors, **options)
    torch.testing.assert_close(merged(f"{method}_fused", tensors, **options), stock)
