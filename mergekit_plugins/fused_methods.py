"""The fused merge methods: a stock mergekit method's spec and contract, `triton_ops` math."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Annotated, Any

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import (
    GroupMergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorEntry,
    TensorGroup,
)
from mergekit.merge_methods.generalized_task_arithmetic import (
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
)
from mergekit.sparsify import SparsificationMethod
from pydantic import PlainValidator

import triton_ops
from triton_ops import tensor_stream
from triton_ops.inputs import check_seed

# Fused method name -> the mergekit built-in whose parameters, scopes and defaults it copies.
FUSED_FROM: dict[str, str] = {
    "ties_fused": "ties",
    "dare_ties_fused": "dare_ties",
    "dare_linear_fused": "dare_linear",
    "task_arithmetic_fused": "task_arithmetic",
    "breadcrumbs_fused": "breadcrumbs",
    "breadcrumbs_ties_fused": "breadcrumbs_ties",
}

# A plain validator, so the config error names the parameter (pydantic's would not).
SEED_PARAMETER = ParameterSpec(
    "seed",
    Annotated[int, PlainValidator(check_seed)],
    ParameterScope.SHARED,
    default=0,
    description="DARE keep masks depend only on (seed, tensor name, expert index, element).",
)

_SUPPORTED = {
    (ConsensusMethod.sum, SparsificationMethod.magnitude),
    (ConsensusMethod.sum, SparsificationMethod.random),
    (None, SparsificationMethod.random),
    (None, None),
    (None, SparsificationMethod.magnitude_outliers),
    (ConsensusMethod.sum, SparsificationMethod.magnitude_outliers),
}


@dataclass(frozen=True)
class FusedTaskArithmeticMerge(GroupMergeMethod):
    """mergekit's `stock` method (`ties`, `dare_ties`, `dare_linear`, `task_arithmetic`,
    `breadcrumbs` or `breadcrumbs_ties`) under `name`, with the per-tensor math done by
    `triton_ops`.

    Its spec is the stock method's public spec, renamed; DARE variants add a shared `seed`
    (default 0). `int8_mask` is accepted and ignored: the fused merge builds no mask tensor.
    Weights, and DARE densities, are rounded to the compute dtype exactly as mergekit rounds
    them, so the fused method makes mergekit's sign decisions.
    """

    stock: GeneralizedTaskArithmeticMerge
    name: str

    def __post_init__(self) -> None:
        pair = (self.stock.consensus_method, self.stock.sparsification_method)
        if pair not in _SUPPORTED:
            raise ValueError(
                f"{self.name}: no fused kernel for consensus={pair[0]} with "
                f"sparsification={pair[1]}; supported are task arithmetic, TIES, DARE-TIES, "
                "DARE-linear, Breadcrumbs and Breadcrumbs-TIES."
            )

    @cached_property
    def spec(self) -> MergeMethodSpec:
        stock = self.stock.spec
        parameters = (*stock.parameters, SEED_PARAMETER) if self.is_dare else stock.parameters
        return replace(
            stock, name=self.name, pretty_name=f"{stock.pretty_name} (fused)", parameters=parameters
        )

    @property
    def consensus_method(self) -> ConsensusMethod | None:
        """The stock method's attribute, for code that inspects a method (mergekit's tests do)."""
        return self.stock.consensus_method

    @property
    def sparsification_method(self) -> SparsificationMethod | None:
        return self.stock.sparsification_method

    @property
    def is_dare(self) -> bool:
        return self.sparsification_method == SparsificationMethod.random

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        name = group.metadata.name
        try:
            return self._merge(base, entries, name, parameters)
        except ValueError as error:
            ids = ", ".join(f"{i}: {entry.id!r}" for i, entry in enumerate(entries))
            raise ValueError(
                f"{self.name} cannot merge tensor {name!r}: {error} (experts by index: {ids})"
            ) from error

    def _merge(
        self,
        base: torch.Tensor,
        entries: Sequence[TensorEntry],
        name: str | None,
        parameters: dict[str, Any],
    ) -> torch.Tensor:
        experts, densities = self._effective_inputs(
            base, entries, parameters["density"], tensor_name=name
        )
        # mergekit multiplies the deltas by torch.tensor(weights, dtype=compute dtype).
        weights = _as_mergekit_rounds(parameters["weight"].values_for(entries), base.dtype)
        shared = dict(weights=weights, lambda_=parameters["lambda"])
        method = self.sparsification_method
        consensus = self.consensus_method is not None
        if method == SparsificationMethod.random:
            return triton_ops.dare_merge(
                base,
                experts,
                densities=_as_mergekit_rounds(densities, _bernoulli_dtype(base)),
                consensus=consensus,
                normalize=parameters["normalize"],
                rescale="l1" if parameters["rescale"] else None,
                seed=parameters["seed"],
                stream=tensor_stream(name or ""),
                **shared,
            )
        if method == SparsificationMethod.magnitude:
            return triton_ops.ties_merge(
                base,
                experts,
                densities=densities,
                normalize=parameters["normalize"],
                rescale=parameters["rescale"],
                **shared,
            )
        if method == SparsificationMethod.magnitude_outliers:
            return triton_ops.breadcrumbs_merge(
                base,
                experts,
                densities=densities,
                gammas=parameters["gamma"].values_for(entries),
                consensus=consensus,
                normalize=parameters["normalize"],
                rescale=parameters["rescale"],
                **shared,
            )
        return triton_ops.task_arithmetic(
            base, experts, normalize=parameters["normalize"], **shared
        )

    def _effective_inputs(
        self,
        base: torch.Tensor,
        entries: Sequence[TensorEntry],
        densities: PerInputValues[float],
        *,
        tensor_name: str | None,
    ) -> tuple[list[torch.Tensor], list[float]]:
        """Map mergekit's density conventions onto triton_ops' (0, 1] densities.

        mergekit keeps everything for density >= 1 and zeroes the delta for density <= 0
        (DARE: exactly 0; below 0 `torch.bernoulli` fails). A zero delta is the base itself
        at density 1: it adds nothing, never agrees with an elected sign, and its weight still
        counts in a linear divisor, exactly as in mergekit.
        """
        experts, kept = [], []
        for entry in entries:
            density = densities[entry.id]
            if self.is_dare and density < 0:
                raise ValueError(
                    f"{self.name}: density {density} for {entry.id} on tensor "
                    f"{tensor_name!r} is negative; DARE keeps each entry with probability "
                    "density, so use a value in [0, 1]."
                )
            dropped = density <= 0
            experts.append(base if dropped else entry.tensor)
            kept.append(1.0 if dropped else min(density, 1.0))
        return experts, kept


def _as_mergekit_rounds(values: Sequence[float], dtype: torch.dtype) -> list[float]:
    """The values as a tensor of `dtype` holds them (exact for float64)."""
    return torch.tensor(list(values), dtype=dtype).tolist()


def _bernoulli_dtype(base: torch.Tensor) -> torch.dtype:
    """The dtype mergekit's `bernoulli` draws its keep probability in: the tensor's, except on
    the CPU, where only bfloat16 stays and the rest is drawn in float32."""
    if base.device.type != "cpu" or base.dtype == torch.bfloat16:
        return base.dtype
    return torch.float32


FUSED_METHODS: tuple[FusedTaskArithmeticMerge, ...] = tuple(
    FusedTaskArithmeticMerge(merge_methods.get(stock), name) for name, stock in FUSED_FROM.items()
)


def register() -> None:
    """Register the fused methods (`ties_fused`, `dare_ties_fused`, `dare_linear_fused`,
    `task_arithmetic_fused`, `breadcrumbs_fused`, `breadcrumbs_ties_fused`); idempotent.

    >>> import mergekit_plugins  # importing registers; calling again is a no-op
    >>> mergekit_plugins.register()
    """
    registered = {method.spec.name: method for method in merge_methods.registered_methods()}
    for method in FUSED_METHODS:
        existing = registered.get(method.spec.name)
        if existing is None:
            merge_methods.register(method)
        elif not isinstance(existing, FusedTaskArithmeticMerge):
            raise ValueError(
                f"merge method {method.spec.name!r} is already registered by "
                f"{type(existing).__module__}; uninstall the package that provides it."
            )
