"""Merge methods a sweep can run, as the paper defines them: theta0 + sum_i (1/k) Psi(v_i).

A `MethodSpec` is one entry of a sweep's `methods:` list. The task-arithmetic family (`average`,
`task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`, also
spelled with mergekit's `_fused` suffix) takes the fast path: each expert is prepared once (trimmed
or dropped) and every subset is one fused `triton_ops` pass. Its defaults are mergekit's (density
1.0, `normalize` true for TIES, L1 rescale for DARE), so a sweep entry means what the same entry
means in a mergekit YAML. The paper's settings are one line each: `{name: task_arithmetic,
lambda: 0.8}`, `{name: ties, density: 0.5, lambda: 0.5}`, `{name: dare_ties, density: 0.8,
rescale: inverse}`.

Any other merge method registered with mergekit (`model_stock`, `karcher`, `sce`, `della`, ...)
runs through mergekit's own `merge_tensors`, tensor by tensor, with its parameters checked
against the method's spec up front; a `weight` it needs and is not given is 1/k per expert.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

import triton_ops
from triton_ops.inputs import check_density, check_gamma, check_lambda, check_rescale, check_seed

from .errors import SweepConfigError

# Fast-path method name -> its parameters and their defaults.
METHOD_PARAMETERS: dict[str, dict[str, Any]] = {
    "average": {},
    "task_arithmetic": {"lambda": 1.0, "normalize": False},
    "ties": {"density": 1.0, "lambda": 1.0, "normalize": True},
    "dare_ties": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1", "seed": 0},
    "dare_linear": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1", "seed": 0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.01, "lambda": 1.0, "normalize": False},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.01, "lambda": 1.0, "normalize": False},
}
_CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties")
_PREPARED = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")
_FUSED_SUFFIX = "_fused"


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
        label = str(entry.pop("label", name))
        fast = _fast_path_name(name)
        if fast is not None:
            return cls(name=fast, params=_fast_path_params(fast, entry), label=label)
        if not isinstance(name, str) or name not in _mergekit_methods():
            raise SweepConfigError(_unknown_method_message(name))
        return cls(name=name, params=_mergekit_params(name, entry), label=label)

    @property
    def fused(self) -> bool:
        """Whether the method takes the fast path (a fused pass per subset)."""
        return self.name in METHOD_PARAMETERS

    @property
    def elects_signs(self) -> bool:
        """Whether a subset's merge keeps each entry's majority sign (TIES and its kin): what an
        expert adds then depends on the others, not a fixed vector of its own."""
        return self.name in _CONSENSUS

    @property
    def prepares_experts(self) -> bool:
        """Whether each expert's task vector is trimmed or dropped before merging."""
        return self.name in _PREPARED

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
        if self.name in ("breadcrumbs", "breadcrumbs_ties"):
            return triton_ops.trim(task_vector, p["density"], gamma=p["gamma"]), 1.0
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
        *,
        tensor_name: str | None = None,
    ) -> torch.Tensor:
        """Merge prepared task vectors of k experts into the base with weights 1/k."""
        k = len(task_vectors)
        if not self.fused:
            return self._merge_with_mergekit(base, task_vectors, tensor_name)
        return triton_ops.merge_task_vectors(
            base,
            task_vectors,
            weights=[1.0 / k] * k,
            scales=scales,
            consensus=self.name in _CONSENSUS,
            normalize=self.params.get("normalize", False),
            lambda_=self.params.get("lambda", 1.0),
        )

    def _merge_with_mergekit(
        self, base: torch.Tensor, task_vectors: Sequence[torch.Tensor], tensor_name: str | None
    ) -> torch.Tensor:
        """The experts' weights (base + task vector) through mergekit's own merge_tensors."""
        from mergekit.merge_methods.api import merge_tensors
        from mergekit.merge_methods.base import BasePolicy

        method = _mergekit_methods()[self.name]
        experts = [base + vector for vector in task_vectors]
        with_base = method.spec.contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)
        parameters = dict(self.params)
        weight = next((p for p in method.spec.parameters if p.name == "weight"), None)
        if weight is not None and "weight" not in parameters:
            parameters["weight"] = [1.0 / len(experts)] * len(experts)
        merged = merge_tensors(
            [base, *experts] if with_base else experts,
            method,
            parameters=parameters,
            base_index=0 if with_base else None,
            name=tensor_name,
        )
        return merged.to(base.dtype)


def _fast_path_name(name: object) -> str | None:
    """The fast-path method a name means (`ties_fused` is `ties`), or None."""
    if name == "average":
        return name
    if not isinstance(name, str):
        return None
    plain = name.removesuffix(_FUSED_SUFFIX)
    return plain if plain in METHOD_PARAMETERS and plain != "average" else None


def _fast_path_params(name: str, entry: dict[str, Any]) -> dict[str, Any]:
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
    return params


def _mergekit_params(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A registered mergekit method's parameters, checked against its spec; shared scalars
    broadcast to every expert as mergekit broadcasts them."""
    spec = _mergekit_methods()[name].spec
    known = {p.name: p for p in spec.parameters}
    unknown = sorted(set(entry) - set(known))
    if unknown:
        raise SweepConfigError(
            f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; mergekit's "
            f"{name} takes: {', '.join(known) or 'none'} (and an optional label)."
        )
    for key, value in entry.items():
        try:
            values = value if isinstance(value, list) else [value]
            for item in values:
                known[key].validate(item)
        except Exception as error:  # pydantic's ValidationError, or the spec's own check
            raise SweepConfigError(
                f"method {name!r}: {key}={value!r} is invalid: {error}"
            ) from None
    missing = [p.name for p in spec.parameters if p.required and p.name not in entry]
    missing = [m for m in missing if m != "weight"]
    if missing:
        raise SweepConfigError(
            f"method {name!r} needs {', '.join(map(repr, missing))} (mergekit has no default)."
        )
    return dict(entry)


@cache
def _mergekit_methods() -> dict[str, Any]:
    """mergekit's registered methods by name, the fused ones included."""
    from mergekit import merge_methods

    import mergekit_plugins  # noqa: F401  (registers the fused methods)

    return {method.spec.name: method for method in merge_methods.registered_methods()}


def _unknown_method_message(name: object) -> str:
    valid = sorted({*METHOD_PARAMETERS, *_mergekit_methods()})
    close = difflib.get_close_matches(str(name).replace("-", "_"), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown merge method {name!r};{hint} use one of {', '.join(valid)}."


def _check_params(name: str, params: dict[str, Any]) -> None:
    """The checks `triton_ops` makes, up front, with the method named."""
    checks = {
        "density": check_density,
        "gamma": check_gamma,
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
