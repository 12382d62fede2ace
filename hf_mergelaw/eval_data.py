"""Held-out evaluation data of a sweep: JSON-lines files or `datasets` datasets, read offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SweepConfigError
from .files import read_json, read_jsonl
from .sweep_config import EvalConfig

# build_eval_set keyword -> the EvalConfig key naming its field.
COLUMN_FIELDS = {
    "texts": "text_field",
    "prompts": "prompt_field",
    "responses": "response_field",
    "domains": "domain_field",
}


def load_eval_columns(config: EvalConfig) -> dict[str, list[Any] | None]:
    """The keyword arguments of `build_eval_set`: texts, or prompts and responses; domains."""
    rows = _rows(config)
    if config.max_samples is not None:
        rows = rows[: config.max_samples]
    if not rows:
        raise SweepConfigError(f"eval data {config.data} (split {config.split!r}) is empty.")
    columns: dict[str, list[Any] | None] = {}
    for column, key in COLUMN_FIELDS.items():
        field = getattr(config, key)
        if field is None:
            columns[column] = None
            continue
        missing = next((i for i, row in enumerate(rows) if field not in row), None)
        if missing is not None:
            raise SweepConfigError(
                f"eval data {config.data}: record {missing} has no field {field!r}; set "
                f"eval.{key} to one of its fields ({', '.join(rows[missing])})."
            )
        columns[column] = [row[field] for row in rows]
    return columns


def _rows(config: EvalConfig) -> list[dict[str, Any]]:
    path = Path(config.data)
    if path.suffix in (".jsonl", ".json") and not path.is_file():
        raise SweepConfigError(
            f"eval data {path} does not exist (a relative eval.data is resolved against the "
            "sweep YAML's folder)."
        )
    if path.suffix == ".jsonl":
        return [row for _, row in read_jsonl(path)]
    if path.suffix == ".json":
        rows = read_json(path, "eval data")
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise SweepConfigError(
                f"eval data {path} must hold a JSON list of objects (one per example), or be a "
                "JSON-lines file (.jsonl) with one object per line."
            )
        return rows
    import datasets

    try:
        if path.is_dir() and (path / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(str(path))[config.split]
        elif path.is_dir() and (path / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(config.data, split=config.split)
    except Exception as error:
        raise SweepConfigError(
            f"eval data {config.data!r} could not be loaded ({error}). Use a JSON-lines file, a "
            "dataset saved with save_to_disk, or a dataset available offline."
        ) from error
    return list(dataset)
