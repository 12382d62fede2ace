"""What a valid merge call is: checked once, shared by the Triton kernels and the torch path."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ExpertsLike = Sequence[torch.Tensor] | torch.Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# |delta| as an integer: the sign bit cleared. For non-negative floats the integer order of the bit
# pattern is the numeric order, so "k-th largest |delta|" becomes a radix select on integers.
KEY_BITS = {torch.float32: 31, torch.bfloat16: 15, torch.float16: 15, torch.float64: 63}
# Smallest key of an Inf; NaNs are above it.
NONFINITE_KEY = {
    torch.float32: 0x7F800000,
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float64: 0x7FF0000000000000,
}
# The integer type whose bit pattern is the float's.
BITS_DTYPE = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}

RESCALE_MODES = ("l1", "inverse", None)
MAX_SEED = 2**63


@dataclass(frozen=True)
class MergeInputs:
    """A validated merge problem: flat contiguous tensors and one float per expert.

    With `task_vectors`, `experts` hold deltas from the base (already in the compute dtype)
    rather than expert weights.
    """

    base: torch.Tensor
    experts: tuple[torch.Tensor, ...]
    shape: torch.Size
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    task_vectors: bool = False

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def numel(self) -> int:
        return self.base.numel()

    @property
    def accumulator_dtype(self) -> torch.dtype:
        return accumulator_dtype(self.base.dtype)

    @property
    def needs_autograd(self) -> bool:
        """Whether the merge must be differentiable: grad mode on and an input requiring grad."""
        tensors = (self.base, *self.experts)
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 sums for 16- and 32-bit inputs; float64 inputs keep float64 (as mergekit computes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_inputs(
    base: torch.Tensor,
    experts: ExpertsLike,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    task_vectors: bool = False,
) -> MergeInputs:
    """Validate a merge call and flatten its tensors; ValueError names the problem and the fix."""
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor, got {type(base).__name__}")
    check_tensor_values(base, "base")
    expert_list = _as_expert_list(experts)
    for index, expert in enumerate(expert_list):
        _check_expert(index, expert, base)
    k = len(expert_list)
    weights = per_expert_floats("weights", weights, k)
    if densities is None:
        densities = (1.0,) * k
    densities = tuple(
        check_density(d, f"density of expert {i}")
        for i, d in enumerate(per_expert_floats("densities", densities, k))
    )
    return MergeInputs(
        base=base.reshape(-1).contiguous(),
        experts=tuple(e.reshape(-1).contiguous() for e in expert_list),
        shape=base.shape,
        weights=weights,
        densities=densities,
        task_vectors=task_vectors,
    )


def check_tensor_values(tensor: torch.Tensor, what: str) -> None:
    """A tensor a merge can read: floating point of a supported dtype, holding values."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{what} has dtype {tensor.dtype}; merges support float32, bfloat16, float16 and "
            "float64. Cast the base and experts to one of them first."
        )
    if tensor.is_meta:
        raise ValueError(
            f"{what} is a meta tensor: it has a shape but no values, so there is nothing to "
            "merge. Load the weights first (e.g. from_pretrained without a meta device_map)."
        )


def check_density(value: object, what: str = "density") -> float:
    """A keep fraction: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{what} is {value!r}; it must be in (0, 1]. Use 1.0 to keep every entry.")
    return float(value)


def check_gamma(value: object, what: str = "gamma") -> float:
    """The share of largest magnitudes Model Breadcrumbs drops: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} is {value!r}; it must be in [0, 1] (0 drops no outliers).")
    return float(value)


def check_lambda(value: object, what: str = "lambda_") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}; it must be finite (1.0 leaves deltas unscaled).")
    return float(value)


def check_rescale(value: object, what: str = "rescale") -> str | None:
    if value not in RESCALE_MODES:
        raise ValueError(
            f"{what}={value!r} is not supported; use 'l1' (mergekit's L1-norm matching), "
            "'inverse' (1/density, as in the DARE paper) or None."
        )
    return value


def check_seed(value: object, what: str = "seed") -> int:
    """An integer in [0, 2**63): Python ints and numpy integers, never bools."""
    try:
        seed = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        seed = None
    if seed is None or not 0 <= seed < MAX_SEED:
        raise ValueError(f"{what}={value!r} must be an integer in [0, 2**63).")
    return seed


def raise_for_nonfinite(base: torch.Tensor, counts: Sequence[int]) -> None:
    """Turn per-expert counts of non-finite deltas into an error that says where they come from."""
    bad = [(index, count) for index, count in enumerate(counts) if count]
    if not bad:
        return
    base_bad = int((~torch.isfinite(base)).sum())
    if base_bad:
        raise ValueError(
            f"the base tensor has {base_bad} non-finite values (NaN or Inf); every merged entry "
            "there would be non-finite. Check the base checkpoint, or repair it with "
            "torch.nan_to_num before merging."
        )
    index, count = bad[0]
    others = f" (experts {[i for i, _ in bad]} are affected)" if len(bad) > 1 else ""
    raise ValueError(
        f"expert {index} has {count} non-finite values (NaN or Inf, or an overflow of its delta "
        f"from the base in the compute dtype){others}. Check that expert's checkpoint, or repair "
        "it with torch.nan_to_num; if the delta overflows float16, merge in float32 or bfloat16."
    )


def _as_expert_list(experts: ExpertsLike) -> list[torch.Tensor]:
    if isinstance(experts, torch.Tensor):
        expert_list = list(experts.unbind(0)) if experts.dim() > 0 else []
    else:
        expert_list = list(experts)
    if not expert_list:
        raise ValueError(
            "no experts given (k = 0): a merge needs at least one expert tensor. "
            "Without experts the merge is just the base; use the base tensor directly."
        )
    return expert_list


def _check_expert(index: int, expert: object, base: torch.Tensor) -> None:
    if not isinstance(expert, torch.Tensor):
        raise TypeError(f"expert {index} must be a torch.Tensor, got {type(expert).__name__}")
    if expert.shape != base.shape:
        raise ValueError(
            f"expert {index} has shape {tuple(expert.shape)} but the base has shape "
            f"{tuple(base.shape)}; every expert must be the same tensor of a model with the "
            "base's architecture."
        )
    if expert.dtype != base.dtype:
        raise ValueError(
            f"expert {index} has dtype {expert.dtype} but the base has {base.dtype}; cast the "
            "experts to the base dtype (expert.to(base.dtype)) so deltas are computed in one dtype."
        )
    if expert.device != base.device:
        raise ValueError(
            f"expert {index} is on {expert.device} but the base is on {base.device}; move every "
            "tensor to one device before merging."
        )


def per_expert_floats(name: str, values: Sequence[float], k: int) -> tuple[float, ...]:
    """One finite float per expert."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, numbers.Number | str) or not isinstance(values, Sequence):
        raise ValueError(
            f"{name}={values!r}: pass a sequence with one value per expert, e.g. "
            f"[{values!r}] * {k} for {k} experts."
        )
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={values!r}: every value must be a number.") from None
    if len(values) != k:
        raise ValueError(f"got {len(values)} {name} for {k} experts; pass exactly one per expert.")
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"{name}[{index}] is {value}; every value must be finite.")
    return values
