"""Merge methods a sweep can run, as the paper defines them: theta0 + sum_i (1/k) Psi(v_i).

A `MethodSpec` is one entry of a sweep's `methods:` list. Its math is `triton_ops`; the defaults
are mergekit's (density 1.0, `normalize` true for TIES, L1 rescale for DARE), so a sweep entry
means what the same entry means in a mergekit YAML. The paper's settings are one line each:
`{name: task_arithmetic, lambda: 0.8}`, `{name: ties, density: 0.5, lambda: 0.5}`,
`{name: dare_ties, density: 0.8, rescale: inverse}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import triton_ops
from triton_ops.inputs import check_density, check_lambda, check_rescale, check_seed

from .errors import SweepConfigError

# Method name -> its parameters and their defaults.
METHOD_PARAMETERS: dict[str, dict[str, Any]] = {
    "average": {},
    "task_arithmetic": {"lambda": 1.0, "normalize": False},
    "ties": {"density": 1.0, "lambda": 1.0, "normalize": True},
    "dare_ties": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1", "seed": 0},
    "dare_linear": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1", "seed": 0},
}


@dataclass(frozen=True)
class MethodSpec:
    """One merge method with all its parameters resolved.

    >>> spec = MethodSpec.from_config({"name": "ties", "density": 0.5})
    >>> spec.label, spec.params["lambda"]
    ('ties', 1.0)
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> MethodSpec:
        entry = dict(entry)
        name = entry.pop("name", None)
        if name not in METHOD_PARAMETERS:
            raise SweepConfigError(
                f"unknown merge method {name!r}; use one of {', '.join(METHOD_PARAMETERS)}."
            )
        label = str(entry.pop("label", name))
        defaults = METHOD_PARAMETERS[name]
        unknown = sorted(set(entry) - set(defaults))
        if unknown:
            allowed = ", ".join(defaults) or "none"
            raise SweepConfigError(
                f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters are: {allowed} (and an optional label)."
            )
        params = {**defaults, **entry}
        _check_params(name, params)
        return cls(name=name, params=params, label=label)

    @property
    def prepares_experts(self) -> bool:
        """Whether each expert's task vector is trimmed or dropped before merging."""
        return self.name in ("ties", "dare_ties", "dare_linear")

    def prepare(
        self, task_vector: torch.Tensor, *, tensor_name: str, expert_index: int
    ) -> tuple[torch.Tensor, float]:
        """One expert's task vector as this method merges it, and its scale factor.

        Independent of the subset: a sweep prepares each expert once per method. DARE keeps
        are drawn per (seed, tensor name, expert's index in the pool).
        """
        p = self.params
        if self.name == "ties":
            return triton_ops.trim(task_vector, p["density"]), 1.0
        if self.name in ("dare_ties", "dare_linear"):
            return triton_ops.drop(
                task_vector,
                p["density"],
                rescale=p["rescale"],
                seed=p["seed"],
                stream=triton_ops.tensor_stream(tensor_name),
                expert_index=expert_index,
            )
        return task_vector, 1.0

    def merge(
        self,
        base: torch.Tensor,
        task_vectors: Sequence[torch.Tensor],
        scales: Sequence[float],
    ) -> torch.Tensor:
        """Merge prepared task vectors of k experts into the base with weights 1/k."""
        k = len(task_vectors)
        return triton_ops.merge_task_vectors(
            base,
            task_vectors,
            weights=[1.0 / k] * k,
            scales=scales,
            consensus=self.name in ("ties", "dare_ties"),
            normalize=self.params.get("normalize", False),
            lambda_=self.params.get("lambda", 1.0),
        )


def _check_params(name: str, params: dict[str, Any]) -> None:
    """The checks `triton_ops` makes, up front, with the method named."""
    checks = {
        "density": check_density,
        "lambda": check_lambda,
        "rescale": check_rescale,
        "seed": check_seed,
    }
    try:
        for key, check in checks.items():
            if key in params:
                check(params[key], f"method {name!r}: {key}")
    except ValueError as error:
        raise SweepConfigError(str(error)) from None
    if not isinstance(params.get("normalize", False), bool):
        raise SweepConfigError(
            f"method {name!r}: normalize={params['normalize']!r} must be true or false."
        )
