"""The fused merge methods: mergekit's parameter handling, `triton_ops` math."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Annotated, Any

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import (
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

# Fused method name -> the mergekit built-in whose parameters, scopes and defaults it copies.
FUSED_FROM: dict[str, str] = {
    "ties_fused": "ties",
    "dare_ties_fused": "dare_ties",
    "dare_linear_fused": "dare_linear",
}


def _seed(value: object) -> int:
    # A plain validator so the config error names the parameter (pydantic's would not).
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {value!r}")
    return value


SEED_PARAMETER = ParameterSpec(
    "seed",
    Annotated[int, PlainValidator(_seed)],
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
class FusedTaskArithmeticMerge(GeneralizedTaskArithmeticMerge):
    """`ties`, `dare_ties` or `dare_linear` with the per-tensor math done by `triton_ops`.

    Inherits mergekit's parameter list and defaults; DARE variants add a shared `seed`
    (default 0). `int8_mask` is accepted and ignored: the fused merge builds no mask tensor.
    """

    def __post_init__(self) -> None:
        if (self.consensus_method, self.sparsification_method) not in _SUPPORTED:
            raise ValueError(
                f"{self.method_name}: no fused kernel for consensus={self.consensus_method} "
                f"with sparsification={self.sparsification_method}; supported are TIES, "
                "DARE-TIES and DARE-linear."
            )

    @cached_property
    def spec(self) -> MergeMethodSpec:
        inherited = GeneralizedTaskArithmeticMerge.spec.func(self)
        if not self.is_dare:
            return inherited
        return replace(inherited, parameters=(*inherited.parameters, SEED_PARAMETER))

    @property
    def is_dare(self) -> bool:
        return self.sparsification_method == SparsificationMethod.random

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
                    consensus=self.consensus_method is not None,
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
            raise ValueError(
                f"{self.method_name} cannot merge tensor {name!r}: {error}{hint}"
            ) from error

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
                    f"{self.method_name}: density {density} for {entry.id} on tensor "
                    f"{tensor_name!r} is negative; DARE keeps each entry with probability "
                    "density, so use a value in [0, 1]."
                )
            dropped = density <= 0
            experts.append(base if dropped else entry.tensor)
            kept.append(1.0 if dropped else min(density, 1.0))
        return experts, kept


def fused_variant(original: GeneralizedTaskArithmeticMerge, name: str) -> FusedTaskArithmeticMerge:
    """A fused method configured exactly like mergekit's `original`, under a new name."""
    settings = {field.name: getattr(original, field.name) for field in fields(original)}
    settings.update(
        method_name=name,
        method_pretty_name=f"{original.method_pretty_name} (fused)",
    )
    return FusedTaskArithmeticMerge(**settings)


FUSED_METHODS: tuple[FusedTaskArithmeticMerge, ...] = tuple(
    fused_variant(merge_methods.get(original), name) for name, original in FUSED_FROM.items()
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
