"""File helpers every writer and reader of the project shares.

- Writes are atomic (temp file in the same folder, then ``os.replace``): a failed or killed
  command never leaves a half-written file, and an existing file is either the old one or the new.
- JSON is written strictly: NaN and infinities become ``null``, numpy scalars Python numbers.
- JSON lines are read with one policy: a last line without its newline that does not parse is a
  write still in flight (or cut by a crash) and is skipped; any other line that is not a JSON
  object is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RecordsFileError, UserError


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    The temp file is opened exclusively under a random name (not via ``mkstemp``) so the result
    gets the usual umask permissions rather than 0600.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist.")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("xb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_text(data: Any) -> str:
    """Strict JSON (see :func:`json_safe`), indented, with a final newline."""
    return json.dumps(json_safe(data), indent=1) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, json_text(data))


def read_json(path: str | Path, what: str) -> Any:
    """A JSON document; a missing or unparsable file is a :class:`UserError` naming ``what``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not valid JSON ({error}).") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every record of a JSON-lines file, by the module's policy."""
    path = Path(path)
    with path.open("rb") as handle:
        lines = handle.read().split(b"\n")
    last = len(lines)
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if number == last:
                return  # no newline after it: an unfinished write
            raise RecordsFileError(
                f"{path}:{number} is not a JSON record ({error}); fix or remove that line."
            ) from None
        if not isinstance(record, dict):
            raise RecordsFileError(
                f"{path}:{number} is a JSON {type(record).__name__}, not an object; every line "
                "must be one record {...}."
            )
        yield number, record


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None and numpy scalars by Python ones, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return json_float(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def json_float(value: float | None) -> float | None:
    """A float for JSON: None for NaN, infinities and None."""
    return float(value) if value is not None and math.isfinite(value) else None


def float_from_json(value: Any) -> float:
    """The inverse of :func:`json_float`: None reads back as NaN."""
    return math.nan if value is None else float(value)
