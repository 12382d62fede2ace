"""What a sweep's records were measured with, so that resuming never mixes two configurations.

A records file ``results.jsonl`` has a companion ``results.provenance.json`` holding the identity
of everything that changes a record but is not in it: the base checkpoint, each expert, the
tokenized eval data (its data, tokenizer and ``max_length``), the dtype, the device type, ``N``
and the project's version. A resumed sweep compares; a difference stops it, naming what changed.

Checkpoint identities are the names, sizes and modification times of a folder's files (cheap,
and they change whenever a file is rewritten); in-memory experts (the Trainer callback's) are
identified by a digest of a sample of every tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .errors import SweepConfigError
from .files import read_json, write_json

FORMAT = 1
_SAMPLE = 4096  # values per tensor in an in-memory digest


@dataclass(frozen=True)
class Provenance:
    base: str
    eval: str
    dtype: str
    device: str
    N: float
    version: str
    experts: dict[str, str] = field(default_factory=dict)

    def changes_from(self, old: Provenance) -> list[str]:
        """What differs from ``old``; experts only where both know the name (a pool may grow)."""
        changes = [
            f"{what} ({getattr(old, name)} -> {getattr(self, name)})"
            for name, what in (("dtype", "dtype"), ("device", "device type"), ("N", "N"))
            if getattr(old, name) != getattr(self, name)
        ]
        if old.version != self.version:
            changes.append(f"hf-mergelaw version ({old.version} -> {self.version})")
        if old.base != self.base:
            changes.append("the base model (its files changed)")
        if old.eval != self.eval:
            changes.append("the eval set (its data, tokenizer or max_length)")
        changes += [
            f"expert {name!r} (its weights changed)"
            for name in sorted(set(old.experts) & set(self.experts))
            if old.experts[name] != self.experts[name]
        ]
        return changes

    def joined(self, old: Provenance) -> Provenance:
        """This provenance with ``old``'s experts kept (their records stay valid)."""
        return replace(self, experts={**old.experts, **self.experts})


def provenance_path(records: Path) -> Path:
    return records.with_name(f"{records.stem}.provenance.json")


def read_provenance(records: Path) -> Provenance | None:
    path = provenance_path(records)
    if not path.exists():
        return None
    data = read_json(path, "sweep provenance")
    try:
        return Provenance(**data["provenance"])
    except (KeyError, TypeError) as error:
        raise SweepConfigError(
            f"{path} is not a provenance file an hf-mergelaw sweep wrote ({error}); restore it, "
            "or start the sweep over with --restart."
        ) from None


def write_provenance(records: Path, provenance: Provenance) -> None:
    write_json(provenance_path(records), {"format": FORMAT, "provenance": asdict(provenance)})


def folder_identity(path: str | Path) -> str:
    """Digest of the names, sizes and modification times of the files of a checkpoint folder."""
    folder = Path(path)
    stats = [
        (str(file.relative_to(folder)), file.stat().st_size, file.stat().st_mtime_ns)
        for file in sorted(folder.rglob("*"))
        if file.is_file()
    ]
    return _digest(json.dumps(stats).encode())


def tensors_identity(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of an in-memory model: each tensor's name, shape, dtype and a strided sample."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.float32).contiguous()
        hasher.update(f"{name}{tuple(tensors[name].shape)}{tensors[name].dtype}".encode())
        hasher.update(sample.numpy().tobytes())
    return hasher.hexdigest()[:16]


def eval_identity(sequences: Iterable[torch.Tensor], domains: Iterable[str] | None) -> str:
    """Digest of tokenized eval data: every sequence's token ids (and labels), and the domains."""
    hasher = hashlib.sha256()
    for tensor in sequences:
        hasher.update(tensor.to("cpu", torch.int64).numpy().tobytes() + b"|")
    hasher.update(json.dumps(None if domains is None else list(domains)).encode())
    return hasher.hexdigest()[:16]


def project_version() -> str:
    try:
        return version("hf-mergelaw")
    except PackageNotFoundError:
        return "unknown"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
