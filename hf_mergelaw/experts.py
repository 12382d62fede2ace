"""A base model and its experts, loaded once, merged into one reusable model for every subset.

Experts are full checkpoints (safetensors or `.bin` directories), PEFT LoRA adapter directories
(densified through PEFT's own merge: the expert is base + the adapter's update) or in-memory
models. Every expert is checked against the base, tensor by tensor, before anything is merged.

The pool holds task vectors (expert - base in the merge dtype). A method that trims or drops them
(TIES, DARE) prepares each expert once and keeps the result while its subsets are merged, so a
merge is one fused pass over the subset's prepared vectors.

Where task vectors live (`storage`):
  "device"  on the merge device: fastest, when they fit;
  "cpu"     in host memory, copied to the device one tensor at a time;
  "disk"    read one tensor at a time from the safetensors files (memory-mapped).
"auto" picks the first that fits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoints import Checkpoint
from .errors import PoolError
from .provenance import folder_identity, tensors_identity
from .sweep_methods import MethodSpec

STORAGES = ("auto", "device", "cpu", "disk")
# Config fields that must agree for two checkpoints to be experts of one base.
ARCHITECTURE_FIELDS = ("model_type", "architectures", "vocab_size")
_DEVICE_FRACTION = 0.7
_HOST_FRACTION = 0.5
# Task vectors plus one prepared copy of them (the current method's trimmed or dropped vectors).
_COPIES_HELD = 2


@dataclass
class Expert:
    """One expert's task vectors: in memory, or its weights in a checkpoint on disk; tensors
    equal to the base's (LoRA leaves most untouched) are not stored."""

    name: str
    identity: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    same_as_base: frozenset[str] = frozenset()


class ExpertPool:
    """Base model plus named experts; `merge` writes a subset's merge into `self.model`.

    >>> pool = ExpertPool("base/", {"math": "ft/math", "code": "ft/code", "bio": "lora/bio"})
    >>> pool.merge(MethodSpec.from_config({"name": "ties", "density": 0.5}), ["math", "bio"])
    >>> pool.model(**batch)  # the merged model
    """

    def __init__(
        self,
        base_model: str | Path,
        experts: Mapping[str, str | Path] | Sequence[str | Path] = (),
        *,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.bfloat16,
        storage: str = "auto",
    ) -> None:
        from transformers import AutoModelForCausalLM

        if storage not in STORAGES:
            raise PoolError(f"storage={storage!r}; use one of {', '.join(STORAGES)}.")
        self.base_path = Path(base_model)
        self.base_checkpoint = Checkpoint(self.base_path, "base model")
        self.base_identity = folder_identity(self.base_path)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=dtype)
        self.model.to(self.device).eval()
        self.parameters = dict(self.model.named_parameters())
        self.base_tensors = {name: p.detach().clone() for name, p in self.parameters.items()}
        self._check_base_checkpoint()
        experts = named_experts(experts)
        self.storage = storage if storage != "auto" else self._auto_storage(len(experts))
        self.experts: dict[str, Expert] = {}
        # (expert, tensor) -> prepared task vector and its scale, for one method at a time.
        self._prepared: dict[tuple[str, str], tuple[torch.Tensor, float]] = {}
        self._prepared_for: str | None = None
        for name, path in experts.items():
            self.add_expert(name, path)

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    @property
    def identities(self) -> dict[str, str]:
        """Each expert's identity (its files, or a digest of its weights), for provenance."""
        return {name: expert.identity for name, expert in self.experts.items()}

    @property
    def num_parameters_billions(self) -> float:
        """N of the scaling law: parameters of the base, in billions."""
        return sum(p.numel() for p in self.parameters.values()) / 1e9

    def add_expert(self, name: str, source: str | Path | nn.Module) -> None:
        """Add an expert from a checkpoint directory, a PEFT adapter directory or a model."""
        if name in self.experts:
            raise PoolError(f"the pool already has an expert named {name!r}; use another name.")
        if isinstance(source, nn.Module):
            expert = self._expert_from_module(name, source)
        elif (Path(source) / "adapter_config.json").exists():
            expert = self._expert_from_adapter(name, Path(source))
        else:
            expert = self._expert_from_checkpoint(name, Path(source))
        self.experts[name] = expert

    def check_model(self, name: str, model: nn.Module) -> None:
        """Refuse a model that cannot join the pool (another architecture), holding nothing."""
        config = getattr(model, "config", None)
        if config is not None:
            self._check_architecture(name, config.to_dict())
        self._check_tensors(name, {n: tuple(t.shape) for n, t in model.named_parameters()})

    @torch.no_grad()
    def merge(self, method: MethodSpec, subset: Sequence[str]) -> None:
        """Overwrite the model's weights with the merge of `subset` (expert names)."""
        unknown = [name for name in subset if name not in self.experts]
        if unknown:
            raise PoolError(
                f"no expert named {unknown[0]!r} in the pool ({', '.join(self.names)})."
            )
        if method.label != self._prepared_for:
            self._prepared.clear()
            self._prepared_for = method.label
        experts = [self.experts[name] for name in subset]
        for name, parameter in self.parameters.items():
            base = self.base_tensors[name]
            if all(name in expert.same_as_base for expert in experts):
                parameter.copy_(base)
                continue
            try:
                prepared = [self._prepared_vector(method, expert, name) for expert in experts]
                vectors = [v.to(self.device, non_blocking=True) for v, _ in prepared]
                scales = [scale for _, scale in prepared]
                parameter.copy_(method.merge(base, vectors, scales, tensor_name=name))
            except ValueError as error:
                raise PoolError(
                    f"{method.label} cannot merge tensor {name!r} of experts {list(subset)} "
                    f"(expert i is the i-th of that list): {error}"
                ) from error

    def merged_vector(self, method: MethodSpec, expert: str, tensor_name: str) -> torch.Tensor:
        """What ``method`` adds to tensor ``tensor_name`` for ``expert`` in a merge of k experts,
        times k: lambda times its prepared (trimmed or dropped, rescaled) task vector. Exact for
        the linear methods; for TIES and DARE-TIES the sign election of a subset keeps less."""
        vector, scale = self._prepared_vector(method, self.experts[expert], tensor_name)
        factor = scale * method.params.get("lambda", 1.0)
        return vector if factor == 1.0 else vector * factor  # no copy for plain averages

    @torch.no_grad()
    def restore_base(self) -> None:
        for name, parameter in self.parameters.items():
            parameter.copy_(self.base_tensors[name])

    def _prepared_vector(
        self, method: MethodSpec, expert: Expert, name: str
    ) -> tuple[torch.Tensor, float]:
        if not method.prepares_experts:
            return self._task_vector(expert, name), 1.0
        key = (expert.name, name)
        if key not in self._prepared:
            vector, scale = method.prepare(
                self._task_vector(expert, name).to(self.device),
                tensor_name=name,
                expert_index=self.names.index(expert.name),
            )
            self._prepared[key] = (vector.to(self._held_device), scale)
        return self._prepared[key]

    def _task_vector(self, expert: Expert, name: str) -> torch.Tensor:
        if name in expert.same_as_base:
            return torch.zeros_like(self.base_tensors[name])
        if expert.checkpoint is not None:
            weights = expert.checkpoint.tensor(name).to(device=self.device, dtype=self.dtype)
            return weights - self.base_tensors[name]
        return expert.tensors[name]

    @property
    def _held_device(self) -> torch.device:
        return self.device if self.storage == "device" else torch.device("cpu")

    def _expert_from_checkpoint(self, name: str, path: Path) -> Expert:
        checkpoint = Checkpoint(path, f"expert {name!r}")
        self._check_architecture(name, checkpoint.config)
        self._check_tensors(name, {n: checkpoint.shape(n) for n in checkpoint.names})
        identity = folder_identity(path)
        if self.storage == "disk" and checkpoint.memory_mapped:
            return Expert(name, identity, checkpoint=checkpoint)
        return Expert(
            name,
            identity,
            tensors={n: self._hold(n, checkpoint.tensor(n)) for n in self.parameters},
        )

    def _expert_from_module(self, name: str, model: nn.Module) -> Expert:
        self.check_model(name, model)
        tensors = dict(model.named_parameters())
        # _hold subtracts the base into a new tensor: a snapshot that later training leaves alone.
        return Expert(
            name,
            tensors_identity(tensors),
            tensors={n: self._hold(n, tensors[n].detach()) for n in self.parameters},
        )

    def _expert_from_adapter(self, name: str, path: Path) -> Expert:
        """Densify a LoRA adapter: PEFT merges it into a copy of the base on the CPU."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        copy = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=self.dtype)
        try:
            merged = PeftModel.from_pretrained(copy, path).merge_and_unload()
        except Exception as error:
            raise PoolError(
                f"expert {name!r}: PEFT could not apply the adapter in {path} to the base model "
                f"({error}). Was the adapter trained on this base model?"
            ) from error
        tensors = dict(merged.named_parameters())
        self._check_tensors(name, {n: tuple(t.shape) for n, t in tensors.items()})
        same = frozenset(
            n for n in self.parameters if torch.equal(tensors[n], self.base_tensors[n].cpu())
        )
        held = {n: self._hold(n, tensors[n].detach()) for n in self.parameters if n not in same}
        return Expert(name, folder_identity(path), tensors=held, same_as_base=same)

    def _hold(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """An expert tensor as the pool keeps it: its task vector, in the merge dtype, where the
        storage says. The delta is formed in the merge dtype, as mergekit forms it."""
        delta = weights.to(device=self.device, dtype=self.dtype) - self.base_tensors[name]
        return delta.to(self._held_device)

    def _check_base_checkpoint(self) -> None:
        names = set(self.base_checkpoint.names)
        missing = [n for n in self.parameters if n not in names]
        if missing:
            raise PoolError(
                f"base model: {self.base_path} has no tensor {missing[0]!r} that the model "
                "declares; the checkpoint does not match its config."
            )

    def _check_architecture(self, name: str, config: Mapping) -> None:
        base = self.base_checkpoint.config
        for key in ARCHITECTURE_FIELDS:
            # A model built in memory may leave a field unset (architectures): not a mismatch.
            if config.get(key) is not None and config.get(key) != base.get(key):
                raise PoolError(
                    f"expert {name!r} has {key}={config.get(key)!r} but the base model has "
                    f"{base.get(key)!r}; every expert must be fine-tuned from the base "
                    "(same architecture and vocabulary)."
                )

    def _check_tensors(self, name: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for tensor, parameter in self.parameters.items():
            if tensor not in shapes:
                raise PoolError(
                    f"expert {name!r} has no tensor {tensor!r}, which the base model has; "
                    "it is not a checkpoint of the base's architecture."
                )
            if tuple(shapes[tensor]) != tuple(parameter.shape):
                raise PoolError(
                    f"expert {name!r}: tensor {tensor!r} has shape {tuple(shapes[tensor])} but "
                    f"the base's has {tuple(parameter.shape)}; every expert must share the base's "
                    "architecture (same hidden sizes, layers and vocabulary)."
                )

    def _auto_storage(self, num_experts: int) -> str:
        expert_bytes = (
            _COPIES_HELD
            * num_experts
            * sum(p.numel() * p.element_size() for p in self.parameters.values())
        )
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if expert_bytes < _DEVICE_FRACTION * free:
                return "device"
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if expert_bytes < _HOST_FRACTION * available:
            return "device" if self.device.type == "cpu" else "cpu"
        return "disk"


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def named_experts(
    experts: Mapping[str, str | Path] | Sequence[str | Path],
) -> dict[str, str | Path]:
    """Experts by name; given as a list, they are named after their directories."""
    if isinstance(experts, Mapping):
        return dict(experts)
    named: dict[str, str | Path] = {}
    for path in experts:
        name = Path(path).name
        if name in named:
            raise PoolError(
                f"two experts are both named {name!r} after their directories; give the experts "
                "as a mapping {name: path} instead of a list."
            )
        named[name] = path
    return named
