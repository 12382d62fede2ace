"""The sweep YAML, validated into dataclasses: unknown keys and bad values fail before any work.

```yaml
base_model: path
experts: {name: path, ...}        # or a list of paths; PEFT adapter dirs allowed
eval:                             # texts or prompt/response pairs; a JSON-lines file or a dataset
  data: path.jsonl                # or a datasets dataset (save_to_disk directory or local name)
  split: validation
  text_field: text                # or prompt_field / response_field; domain_field optional
  max_length: 2048
  batch_size: 8
  tokenizer: path                 # optional; default: the base model's own tokenizer files
methods: [{name: ties, density: 0.5, lambda: 1.0}, {name: average}]
k: 1-9                            # or 1-3,8, a list [1, 2, 4], or one number
sampling: {strategy: balanced | uniform | all | permutations, per_k: 20, seed: 0}
                                  # or {strategy: adaptive, budget: 60, seed: 0}: merges per method
                                  #    prior: weights (default) | curvature | none
output: results.jsonl
device: auto
dtype: bfloat16
```
Relative paths are resolved against the YAML file's directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .adaptive import ADAPTIVE, PRIORS, check_adaptive, check_prior, prior_features
from .errors import PoolError, SweepConfigError, UserError
from .experts import named_experts
from .k_values import parse_k
from .subsets import STRATEGIES, check_all_subsets
from .sweep_methods import MethodSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOP_LEVEL_KEYS = (
    "base_model", "experts", "eval", "methods", "k", "sampling", "output", "device", "dtype",
    "storage", "N",
)  # fmt: skip
EVAL_KEYS = (
    "data", "split", "text_field", "prompt_field", "response_field", "domain_field",
    "max_length", "batch_size", "max_samples", "tokenizer",
)  # fmt: skip
SAMPLING_KEYS = ("strategy", "per_k", "seed", "budget", "prior")
SAMPLING_STRATEGIES = (*STRATEGIES, ADAPTIVE)


@dataclass(frozen=True)
class EvalConfig:
    data: str
    split: str = "validation"
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    domain_field: str | None = None
    max_length: int = 2048
    batch_size: int = 8
    max_samples: int | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class SamplingConfig:
    """Which subsets a sweep merges. ``budget``: merges per method of an adaptive sweep and
    ``prior`` its pool model's prior (:mod:`hf_mergelaw.adaptive`); ``per_k`` is for the other
    strategies."""

    strategy: str = "balanced"
    per_k: int = 20
    seed: int = 0
    budget: int | None = None
    prior: str = "weights"

    @property
    def adaptive(self) -> bool:
        return self.strategy == ADAPTIVE


@dataclass(frozen=True)
class SweepConfig:
    base_model: Path
    experts: dict[str, Path]
    eval: EvalConfig
    methods: list[MethodSpec]
    k: list[int]
    output: Path
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    storage: str = "auto"
    N: float | None = None


def load_sweep_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep config {path} does not exist.")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise SweepConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_sweep_config(raw, root=path.parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_sweep_config(raw: Any, root: Path = Path(".")) -> SweepConfig:
    section = _mapping(raw, "the sweep config", TOP_LEVEL_KEYS)
    for key in ("base_model", "experts", "eval", "methods", "k", "output"):
        if key not in section:
            raise SweepConfigError(f"the sweep config has no {key!r}; it is required.")
    dtype = section.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        raise SweepConfigError(f"dtype={dtype!r}; use one of {', '.join(DTYPES)}.")
    methods = section["methods"]
    if not isinstance(methods, list) or not methods:
        raise SweepConfigError("methods must be a non-empty list, e.g. [{name: average}].")
    specs = [_method(entry, index) for index, entry in enumerate(methods)]
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SweepConfigError(
            f"two methods share the label {duplicates[0]!r}; give each a distinct `label:`."
        )
    n = section.get("N")
    if n is not None and (not _is_number(n) or not 0 < n < float("inf")):
        raise SweepConfigError(f"N={n!r} must be a positive number (billions of parameters).")
    experts = _experts(section["experts"], root)
    try:
        ks = parse_k(section["k"])
    except UserError as error:
        raise SweepConfigError(str(error)) from None
    if ks[-1] > len(experts):
        raise SweepConfigError(
            f"k goes up to {ks[-1]} but the pool has {len(experts)} experts; no subset has more "
            f"experts than the pool. Lower k to at most {len(experts)} or add experts."
        )
    sampling = _sampling(section.get("sampling", {}))
    if sampling.strategy == "all":
        try:
            check_all_subsets(len(experts), ks)
        except UserError as error:
            raise SweepConfigError(f"sampling: {error}") from None
    if sampling.adaptive:
        check_adaptive(len(experts), ks, sampling.budget, prior_features(sampling.prior, specs))
    device = str(section.get("device", "auto"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SweepConfigError(
            f"device={device!r} but torch sees no CUDA device here; use device: cpu (or auto)."
        )
    return SweepConfig(
        base_model=_path(section["base_model"], root),
        experts=experts,
        eval=_eval(section["eval"], root),
        methods=specs,
        k=ks,
        output=_path(section["output"], root),
        sampling=sampling,
        device=device,
        dtype=DTYPES[dtype],
        storage=str(section.get("storage", "auto")),
        N=n,
    )


def _mapping(raw: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SweepConfigError(f"{where} must be a mapping of keys to values.")
    unknown = [key for key in raw if key not in allowed]
    if unknown:
        raise SweepConfigError(
            f"unknown key {unknown[0]!r} in {where}; the allowed keys are: {', '.join(allowed)}."
        )
    return raw


def _path(value: Any, root: Path) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise SweepConfigError(f"expected a path, got {value!r}.")
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _experts(value: Any, root: Path) -> dict[str, Path]:
    if isinstance(value, Mapping):
        paths: Mapping[str, Any] | list[Path] = {str(n): _path(p, root) for n, p in value.items()}
    elif isinstance(value, list):
        paths = [_path(path, root) for path in value]
    else:
        raise SweepConfigError("experts must be a mapping {name: path} or a list of paths.")
    if not paths:
        raise SweepConfigError("experts is empty; a sweep needs at least one expert.")
    try:
        return {name: Path(path) for name, path in named_experts(paths).items()}
    except PoolError as error:
        raise SweepConfigError(str(error)) from None


def _eval(value: Any, root: Path) -> EvalConfig:
    section = dict(_mapping(value, "eval", EVAL_KEYS))
    if "data" not in section:
        raise SweepConfigError("eval has no 'data'; point it at a JSON-lines file or a dataset.")
    data = section.pop("data")
    if not isinstance(data, str) or not data:
        raise SweepConfigError(
            f"eval.data={data!r}: name one JSON-lines file, JSON file or dataset (a path or a "
            "datasets name); merge several files into one first."
        )
    local = _path(data, root)
    if "tokenizer" in section:
        tokenizer = _path(section["tokenizer"], root)
        section["tokenizer"] = str(tokenizer) if tokenizer.exists() else section["tokenizer"]
    has_text = "text_field" in section
    pair_fields = {"prompt_field", "response_field"} & set(section)
    if has_text == bool(pair_fields) or len(pair_fields) == 1:
        raise SweepConfigError(
            "eval needs either text_field, or both prompt_field and response_field (loss on the "
            "response tokens only)."
        )
    for key in ("max_length", "batch_size", "max_samples"):
        if key in section and (not _is_int(section[key]) or section[key] < 1):
            raise SweepConfigError(f"eval.{key}={section[key]!r} must be a positive integer.")
    return EvalConfig(data=str(local) if local.exists() else data, **section)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sampling(value: Any) -> SamplingConfig:
    section = _mapping(value, "sampling", SAMPLING_KEYS)
    sampling = SamplingConfig(**section)
    if sampling.strategy not in SAMPLING_STRATEGIES:
        raise SweepConfigError(
            f"sampling.strategy={sampling.strategy!r}; use one of {', '.join(SAMPLING_STRATEGIES)}."
        )
    if not _is_int(sampling.per_k) or sampling.per_k < 1:
        raise SweepConfigError(f"sampling.per_k={sampling.per_k!r} must be a positive integer.")
    if not _is_int(sampling.seed):
        raise SweepConfigError(f"sampling.seed={sampling.seed!r} must be an integer.")
    if sampling.adaptive:
        _adaptive_keys(section)
    else:
        for key in ("budget", "prior"):
            if key in section:
                raise SweepConfigError(
                    f"sampling.{key} is for strategy 'adaptive', not {sampling.strategy!r}; "
                    "remove it, or set strategy: adaptive (then per_k does not apply)."
                )
    return sampling


def _adaptive_keys(section: Mapping[str, Any]) -> None:
    """An adaptive sweep takes a budget (checked with the pool's size) and no per_k: it chooses
    how many subsets of each size to merge."""
    if "per_k" in section:
        raise SweepConfigError(
            "sampling.per_k does not apply to strategy 'adaptive' (it picks each size's subsets "
            "itself); remove it and give budget: the most merges per method."
        )
    if "budget" not in section:
        raise SweepConfigError(
            "sampling: strategy 'adaptive' needs budget: the most merges per method, e.g. "
            "{strategy: adaptive, budget: 60, seed: 0}."
        )
    check_prior(section.get("prior", PRIORS[0]))


def _method(entry: Any, index: int) -> MethodSpec:
    if not isinstance(entry, Mapping):
        raise SweepConfigError(f"methods[{index}] must be a mapping like {{name: ties}}.")
    try:
        return MethodSpec.from_config(entry)
    except SweepConfigError as error:
        raise SweepConfigError(f"methods[{index}]: {error}") from None
