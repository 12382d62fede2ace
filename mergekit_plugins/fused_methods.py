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
}


@dataclass(frozen=True)
class FusedTaskArithmeticMerge(GroupMergeMethod):
    """mergekit's `stock` method (`ties`, `dare_ties` or `dare_linear`) under `name`, with the
    per-tensor math done by `triton_ops`.

    Its spec is the stock method's public spec, renamed; DARE variants add a shared `seed`
    (default 0). `int8_mask` is accepted and ignored: the fused merge builds no mask tensor.
    """

    stock: GeneralizedTaskArithmeticMerge
    name: str

    def __post_init__(self) -> None:
        pair = (self.stock.consensus_method, self.stock.sparsification_method)
        if pair not in _SUPPORTED:
            raise ValueError(
                f"{self.name}: no fused kernel for consensus={pair[0]} with "
                f"sparsification={pair[1]}; supported are TIES, DARE-TIES and DARE-linear."
            )

    @cached_property
    def spec(self) -> MergeMethodSpec:
        stock = self.stock.spec
        parameters = (*stock.parameters, SEED_PARAMETER) if self.is_dare else stock.parameters
        return replace(
            stock, name=self.name, pretty_name=f"{stock.pretty_name} (fused)", parameters=parameters
        )

    @property
    def is_dare(self) -> bool:
        return self.stock.sparsification_method == SparsificationMethod.random

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        name = group.metadata.name
        experts, densities = self._effective_inputs(
            base, entries, parameters["density"], tensor_name=name
        )
        weights = parameters["weight"].values_for(entries)
        try:
            if self.is_dare:
                return triton_ops.dare_merge(
                    base,
                    experts,
                    weights=weights,
                    densities=densities,
                    consensus=self.stock.consensus_method is not None,
                    normalize=parameters["normalize"],
                    rescale="l1" if parameters["rescale"] else None,
                    lambda_=parameters["lambda"],
                    seed=parameters["seed"],
                    stream=tensor_stream(name or ""),
                )
            return triton_ops.ties_merge(
                base,
                experts,
                weights=weights,
                densities=densities,
                normalize=parameters["normalize"],
                lambda_=parameters["lambda"],
            )
        except ValueError as error:
            # float64 is the one compute dtype mergekit offers that the kernels do not.
            hint = (
                " Set `dtype: float32` in the merge config." if base.dtype == torch.float64 else ""
            )
            raise ValueError(f"{self.name} cannot merge tensor {name!r}: {error}{hint}") from error

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


FUSED_METHODS: tuple[FusedTaskArithmeticMerge, ...] = tuple(
    FusedTaskArithmeticMerge(merge_methods.get(stock), name) for name, stock in FUSED_FROM.items()
)


def register() -> None:
    """Register `ties_fused`, `dare_ties_fused` and `dare_linear_fused` with mergekit; idempotent.

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
