"""Second-order terms of a loss along a pool's task vectors, measured at the base with no merge.

For directions ``u_1..u_M`` (each expert's task vector, as a method merges it) and the loss ``L``
at the base weights ``theta_0``::

    loss = L(theta_0),   g_i = grad L(theta_0) . u_i,   Q_ij = u_i' H u_j

with ``H`` the Hessian of ``L`` (``curvature="hessian"``) or its Gauss-Newton part
``J' H_out J`` (``curvature="ggn"``: PSD whenever the output loss is convex, as cross-entropy is),
so that ``L(theta_0 + sum_i c_i u_i) ~ loss + c . g + c' Q c / 2`` for any merge weights ``c``::

    from hf_mergelaw.curvature import lm_second_order

    directions = [{name: expert[name] - base[name] for name in base} for expert in experts]
    terms = lm_second_order(model, eval_set, directions, curvature="ggn")
    c = np.full(len(directions), 1 / len(directions))  # the average merge
    predicted = {d: t.loss + c @ t.gradient + c @ t.curvature @ c / 2 for d, t in terms.items()}

:func:`second_order` is the generic form: any ``(params, batch) -> outputs`` function and any
``(outputs, batch) -> scalar`` loss, summed over batches. Every sum is accumulated in float64;
memory stays at a few copies of the model plus ``M^2`` numbers (and, for the GGN, the ``M``
output tangents of one batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, jvp
from transformers import PreTrainedModel

from .cross_entropy import EvalSet, _pad_batch, _summed_token_losses
from .errors import UserError
from .record_schema import WHOLE_SET

CURVATURES = ("hessian", "ggn")

Outputs = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
OutputLoss = Callable[[torch.Tensor, Any], torch.Tensor]
Direction = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SecondOrder:
    """Second-order terms of a loss along M directions (float64 numpy).

    ``curvature`` is symmetric. ``num_tokens`` is what the loss averages over: the scored tokens
    for :func:`lm_second_order`, 0 from :func:`second_order` (which cannot know).

    >>> terms.loss + c @ terms.gradient + c @ terms.curvature @ c / 2  # doctest: +SKIP
    """

    loss: float
    gradient: np.ndarray
    curvature: np.ndarray
    num_tokens: int


def second_order(
    outputs: Outputs,
    output_loss: OutputLoss,
    params: Mapping[str, torch.Tensor],
    directions: Sequence[Direction],
    batches: Iterable[Any],
    *,
    curvature: str | None = "hessian",
) -> SecondOrder:
    """Loss, gradient and curvature along ``directions`` of ``L = sum_b output_loss(outputs(
    params, b), b)``.

    A direction is a dict parameter name -> tensor of that parameter's shape; a name it leaves
    out is zero along that parameter. Parameters no direction names are held fixed (not
    differentiated). ``"hessian"`` costs one double-backward pass per direction and batch,
    ``"ggn"`` one forward-mode pass (``outputs`` must then support ``torch.func.jvp``), None
    none: the loss and gradient alone (one backward per batch), curvature zero.

    >>> linear = torch.nn.Linear(3, 1)
    >>> outputs = lambda p, batch: torch.func.functional_call(linear, p, (batch[0],))
    >>> mse = lambda y, batch: ((y - batch[1]) ** 2).mean()
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> terms = second_order(outputs, mse, dict(linear.named_parameters()),
    ...                      [{"bias": torch.ones(1)}], [(x, y)])
    >>> terms.curvature  # the mean squared error's second derivative in the bias
    array([[2.]])
    """
    if curvature is not None:
        _check_curvature(curvature)
    params = {name: tensor.detach() for name, tensor in params.items()}
    vectors = _checked_directions(params, directions)
    active = [name for name in params if any(name in vector for vector in vectors)]
    terms = {None: _gradient_terms, "hessian": _hessian_terms, "ggn": _ggn_terms}[curvature]
    device = next(iter(params.values())).device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    gradient = torch.zeros(len(vectors), dtype=torch.float64, device=device)
    matrix = torch.zeros(len(vectors), len(vectors), dtype=torch.float64, device=device)
    num_batches = 0
    with torch.enable_grad():
        for batch in batches:
            batch_loss, batch_gradient, batch_matrix = terms(
                outputs, output_loss, params, active, vectors, batch
            )
            loss += batch_loss
            gradient += batch_gradient
            matrix += batch_matrix
            num_batches += 1
    if num_batches == 0:
        raise UserError("No batches to evaluate the loss on; pass at least one batch.")
    # Batches fill the upper triangle only (Q is symmetric); the lower one mirrors it.
    return SecondOrder(
        loss=float(loss),
        gradient=gradient.cpu().numpy(),
        curvature=(matrix + matrix.triu(1).T).cpu().numpy(),
        num_tokens=0,
    )


def lm_second_order(
    model: PreTrainedModel,
    eval_set: EvalSet,
    directions: Sequence[Direction],
    *,
    curvature: str = "hessian",
    batch_size: int = 16,
    curvature_sample: float = 1.0,
) -> dict[str, SecondOrder]:
    """Second-order terms of each domain's held-out cross-entropy, around ``model``'s weights.

    Each domain's ``loss`` is the token-weighted mean CE that
    :func:`~hf_mergelaw.cross_entropy.cross_entropy` reports for it (same shift, ignore index and
    fp32 log-softmax); keys are the sorted domain names, or ``"all"`` without domains. Each
    domain's sequences are batched on their own, so all domains together cost one pass over the
    data per direction. The model must be float32 (its base weights); it runs with eager
    attention in eval mode, and both are restored afterwards, weights untouched.

    ``curvature_sample`` below 1 takes the curvature from that share of each domain's sequences
    (evenly spaced, at least one) and the loss and gradient from all of them: the curvature costs
    that share of its passes. On the demo pool a quarter kept the shape R^2 at 0.996 (0.998 from
    every sequence); ``benchmarks/pool_geometry.py`` measures it.

    >>> terms = lm_second_order(model, eval_set, [math_vector, code_vector], batch_size=16)
    >>> terms["math"].loss, terms["math"].gradient, terms["math"].curvature  # doctest: +SKIP
    """
    _check_curvature(curvature)
    if not 0 < curvature_sample <= 1:
        raise UserError(
            f"curvature_sample={curvature_sample!r}: give the share of the sequences the "
            "curvature is taken from, in (0, 1] (1: every sequence)."
        )
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if len(eval_set) == 0:
        raise UserError("The evaluation set has no tokens to score; it holds no sequence.")
    dtypes = sorted({str(p.dtype) for p in model.parameters()} - {str(torch.float32)})
    if dtypes:
        raise UserError(
            f"The model has {', '.join(dtypes)} parameters; load the base in float32 for "
            "curvature: second derivatives in bf16/fp16 lose most of their digits to rounding "
            "(from_pretrained(..., dtype=torch.float32))."
        )
    params = dict(model.named_parameters())

    def outputs(weights: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        input_ids, _, attention_mask = batch
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return functional_call(model, weights, (), inputs).logits

    was_training = model.training
    attention = model.config._attn_implementation
    model.eval()
    # Forward-mode AD (the GGN) and double backward (the Hessian) need plain autograd ops; the
    # fused SDPA/flash kernels provide neither.
    model.set_attn_implementation("eager")
    try:
        results = {}
        for domain, subset in _domain_subsets(eval_set).items():
            if curvature_sample < 1:
                first = _lm_terms(outputs, params, directions, subset, batch_size, None)
                sample = _evenly_spaced(subset, curvature_sample)
                curved = _lm_terms(outputs, params, directions, sample, batch_size, curvature)
                terms = replace(first, curvature=curved.curvature)
            else:
                terms = _lm_terms(outputs, params, directions, subset, batch_size, curvature)
            results[domain] = replace(terms, num_tokens=subset.num_tokens)
    finally:
        model.set_attn_implementation(attention)
        model.train(was_training)
    return results


def _lm_terms(
    outputs: Outputs,
    params: Mapping[str, torch.Tensor],
    directions: Sequence[Direction],
    eval_set: EvalSet,
    batch_size: int,
    curvature: str | None,
) -> SecondOrder:
    """:func:`second_order` of the token-weighted mean CE over ``eval_set``."""
    device = next(iter(params.values())).device
    tokens = eval_set.num_tokens

    def output_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        return _summed_token_losses(logits, batch[1]).sum() / tokens

    batches = _batches(eval_set, batch_size, device)
    return second_order(outputs, output_loss, params, directions, batches, curvature=curvature)


def _evenly_spaced(eval_set: EvalSet, share: float) -> EvalSet:
    """``share`` of the sequences (at least one), evenly spaced over the length-sorted set."""
    count = max(1, round(share * len(eval_set)))
    rows = np.unique(np.linspace(0, len(eval_set) - 1, count).round().astype(int))
    return _sequences(eval_set, rows.tolist())


def _check_curvature(curvature: str) -> None:
    if curvature not in CURVATURES:
        raise UserError(f"curvature={curvature!r} is not one of {', '.join(CURVATURES)}.")


def _gradient_terms(
    outputs: Outputs,
    output_loss: OutputLoss,
    params: dict[str, torch.Tensor],
    active: list[str],
    vectors: list[dict[str, torch.Tensor]],
    batch: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's loss and u_i . grad by one backward; no curvature."""
    loss, _, grads = _loss_and_gradients(outputs, output_loss, params, active, batch, False)
    gradient = torch.stack([_dot(grads, vector) for vector in vectors])
    matrix = torch.zeros(len(vectors), len(vectors), dtype=torch.float64, device=loss.device)
    return loss.detach().double(), gradient, matrix


def _loss_and_gradients(
    outputs: Outputs,
    output_loss: OutputLoss,
    params: dict[str, torch.Tensor],
    active: list[str],
    batch: Any,
    create_graph: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """One batch's loss, the leaves it was differentiated at, and its gradient by name (a graph
    to differentiate again with ``create_graph``)."""
    leaves = [params[name].detach().requires_grad_() for name in active]
    weights = {**params, **dict(zip(active, leaves, strict=True))}
    loss = output_loss(outputs(weights, batch), batch)
    grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, materialize_grads=True)
    return loss, leaves, dict(zip(active, grads, strict=True))


def _checked_directions(
    params: Mapping[str, torch.Tensor], directions: Sequence[Direction]
) -> list[dict[str, torch.Tensor]]:
    """Each direction on its parameter's device and dtype, after checking names and shapes."""
    if len(directions) == 0:
        raise UserError("No directions given; pass at least one (an expert's task vector).")
    vectors = []
    for index, direction in enumerate(directions):
        unknown = sorted(set(direction) - set(params))
        if unknown:
            raise UserError(
                f"direction {index} names tensor {unknown[0]!r}, which the base model does not "
                f"have ({len(unknown)} unknown name(s)); name its tensors as the base's "
                "named_parameters() does."
            )
        for name, tensor in direction.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise UserError(
                    f"direction {index}'s tensor {name!r} has shape {tuple(tensor.shape)}, the "
                    f"base has {tuple(params[name].shape)}; it is not a task vector of this base."
                )
        vectors.append({name: t.detach().to(params[name]) for name, t in direction.items()})
    if not any(vectors):
        raise UserError("Every direction is empty; give each one its tensors (name -> tensor).")
    return vectors


def _hessian_terms(
    outputs: Outputs,
    output_loss: OutputLoss,
    params: dict[str, torch.Tensor],
    active: list[str],
    vectors: list[dict[str, torch.Tensor]],
    batch: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's loss, u_i . grad and u_i' H u_j (j >= i: H is symmetric), by reverse-over-
    reverse AD.

    Measured faster than forward-over-reverse (``jvp`` of ``grad``) and far faster than
    ``torch.func.linearize`` (which re-traces every batch); the first backward is shared by all
    directions and gives the gradient too.
    """
    loss, leaves, grads_by_name = _loss_and_gradients(
        outputs, output_loss, params, active, batch, True
    )
    gradient = torch.stack([_dot(grads_by_name, vector) for vector in vectors])
    matrix = torch.zeros(len(vectors), len(vectors), dtype=torch.float64, device=loss.device)
    for i, vector in enumerate(vectors):
        along = sum((grads_by_name[name] * tensor).sum() for name, tensor in vector.items())
        if not torch.is_tensor(along) or not along.requires_grad:
            continue  # the loss is linear along every parameter this direction touches
        hessian_vector = torch.autograd.grad(
            along, leaves, retain_graph=i < len(vectors) - 1, materialize_grads=True
        )
        row = dict(zip(active, hessian_vector, strict=True))
        matrix[i, i:] = torch.stack([_dot(row, other) for other in vectors[i:]])
    return loss.detach().double(), gradient.detach(), matrix


def _ggn_terms(
    outputs: Outputs,
    output_loss: OutputLoss,
    params: dict[str, torch.Tensor],
    active: list[str],
    vectors: list[dict[str, torch.Tensor]],
    batch: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's loss, u_i . grad and (J u_i)' H_out (J u_j) (j >= i), by forward-mode AD.

    One ``jvp`` per direction: vmapping them holds M output tangents' worth of activations at
    once, which measured slower. H_out only touches the loss head; its products go reverse-over-
    reverse, which measured twice as fast there as ``jvp`` of ``grad``.
    """
    primals = {name: params[name] for name in active}
    fixed = {name: tensor for name, tensor in params.items() if name not in primals}

    def model_outputs(varied: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs({**fixed, **varied}, batch)

    tangents_out = []
    for vector in vectors:
        tangent = {name: vector.get(name, torch.zeros_like(primals[name])) for name in active}
        z, tangent_out = jvp(model_outputs, (primals,), (tangent,))
        tangents_out.append(tangent_out)
    z = z.detach().requires_grad_()
    loss = output_loss(z, batch)
    (loss_gradient,) = torch.autograd.grad(loss, z, create_graph=True)
    gradient = torch.stack([_dot_tensors(loss_gradient, t) for t in tangents_out])
    matrix = torch.zeros(len(vectors), len(vectors), dtype=torch.float64, device=z.device)
    if not loss_gradient.requires_grad:
        return loss.detach().double(), gradient, matrix  # a loss linear in the outputs
    for i, tangent_out in enumerate(tangents_out):
        (curved,) = torch.autograd.grad(
            loss_gradient, z, tangent_out, retain_graph=i < len(vectors) - 1
        )
        matrix[i, i:] = torch.stack([_dot_tensors(curved, other) for other in tangents_out[i:]])
    return loss.detach().double(), gradient, matrix


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """sum_n a[n] . b[n] over b's names, in float64 (b's missing names are zero)."""
    start = next(iter(a.values())).new_zeros((), dtype=torch.float64)
    return sum((_dot_tensors(a[name], tensor) for name, tensor in b.items()), start)


def _dot_tensors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.detach().reshape(-1).double(), b.detach().reshape(-1).double())


def _domain_subsets(eval_set: EvalSet) -> dict[str, EvalSet]:
    """Each domain's sequences as an eval set of their own (still longest first), sorted by name."""
    if eval_set.domains is None:
        return {WHOLE_SET: eval_set}
    return {
        domain: _sequences(eval_set, [i for i, d in enumerate(eval_set.domains) if d == domain])
        for domain in sorted(set(eval_set.domains))
    }


def _sequences(eval_set: EvalSet, rows: Sequence[int]) -> EvalSet:
    """The sequences ``rows`` (in their order) as an eval set without domains."""
    return EvalSet(
        input_ids=tuple(eval_set.input_ids[i] for i in rows),
        labels=tuple(eval_set.labels[i] for i in rows),
        domains=None,
    )


def _batches(
    eval_set: EvalSet, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, len(eval_set), batch_size):
        yield _pad_batch(eval_set, start, min(start + batch_size, len(eval_set)), device)
