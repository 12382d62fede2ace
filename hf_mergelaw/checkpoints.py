"""Lazy, read-only access to the tensors of a Hugging Face checkpoint directory.

Shapes come from file headers (safetensors) or a memory-mapped `torch.load`, so validating a pool
of experts reads no weights. Pickled `.bin` files load with `weights_only=True` only: a checkpoint
that needs arbitrary unpickling is refused rather than executed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .errors import PoolError
from .files import read_json

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class Checkpoint:
    """Tensors of one checkpoint directory (single file or sharded, safetensors or .bin)."""

    def __init__(self, path: str | Path, label: str) -> None:
        self.path = Path(path)
        self.label = label
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"{label}: {self.path} is not a directory. Point it at a checkpoint saved with "
                "save_pretrained (config.json and model weights) or at a PEFT adapter directory."
            )
        self.config = _read_json(self.path / "config.json", label)
        self._files = _weight_files(self.path, label)
        self._handles: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._file_of = {name: file for file, names in self._files.items() for name in names}

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    @property
    def memory_mapped(self) -> bool:
        """True when every file is safetensors, so tensors can be read one at a time."""
        return all(file.suffix == ".safetensors" for file in self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            return tuple(self._safetensors(file).get_slice(name).get_shape())
        return tuple(self._pickle(file)[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.label}: no tensor {name!r} in {self.path}")
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            return self._safetensors(file).get_tensor(name)
        return self._pickle(file)[name]

    def _safetensors(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def _pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            self._pickled[file] = _load_pickle(file, self.label)
        return self._pickled[file]


def _weight_files(path: Path, label: str) -> dict[Path, list[str]]:
    for single, sharded in (SAFETENSORS_FILES, PICKLE_FILES):
        if (path / single).exists() and (path / sharded).exists():
            raise PoolError(
                f"{label}: {path} holds both {single} and the shards of {sharded}; one of them "
                f"is left over from an earlier save into this folder (transformers would load "
                f"{single}). Remove the one you did not write, or save into an empty folder."
            )
    for name in SAFETENSORS_FILES + PICKLE_FILES:
        file = path / name
        if not file.exists():
            continue
        if name.endswith(".index.json"):
            weight_map = _read_json(file, label).get("weight_map")
            if not isinstance(weight_map, dict):
                raise PoolError(
                    f"{label}: {file} has no 'weight_map' of tensor names to shard files; "
                    "re-save the checkpoint with save_pretrained."
                )
            files: dict[Path, list[str]] = {}
            for tensor, shard in weight_map.items():
                files.setdefault(path / shard, []).append(tensor)
            return files
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                return {file: list(handle.keys())}
        return {file: list(_load_pickle(file, label))}
    looked_for = ", ".join(SAFETENSORS_FILES + PICKLE_FILES)
    raise FileNotFoundError(f"{label}: {path} has no model weights (looked for {looked_for}).")


def _load_pickle(file: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "zipfile" not in str(error):
                raise
            # The legacy (pre-zip) format cannot be memory-mapped; it loads whole.
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PoolError(
            f"{label}: {file} cannot be loaded with weights_only=True ({error}). Re-save the "
            "checkpoint with save_pretrained (safetensors) and retry."
        ) from error


def _read_json(file: Path, label: str) -> dict:
    if not file.exists():
        raise FileNotFoundError(
            f"{label}: {file} is missing; a checkpoint directory needs the config.json that "
            "save_pretrained writes."
        )
    return read_json(file, f"{label}:")
