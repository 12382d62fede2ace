"""Sweep records: reading, validating, grouping and aggregating into (N, k) cells.

A record is one merged model: ``{"k": 3, "ce": 0.71, "N": 7, "method": "ties", "domain": "code",
"subset": ["algebra", "code", "physics"], "num_tokens": 51234}``; only ``k`` and ``ce`` are
required, N is in billions of parameters and other fields are ignored. Sources: a JSON-lines
file, a JSON file holding a list (or ``{"records": [...]}``), a CSV file, a list of dicts or a
pandas DataFrame::

    >>> recs = load_records([{"k": 1, "ce": 0.9}, {"k": 2, "ce": -1.0}, {"k": 2, "ce": 0.8}])
    >>> len(recs), recs.dropped
    (2, {'ce is negative': 1})

Invalid rows are dropped and counted by reason (``strict=True`` raises instead); the counts
travel with the records into the fit output so nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecordsError
from ..files import read_jsonl

# A size above this is surely a raw parameter count, not billions.
_MAX_SIZE_BILLIONS = 1e5

RecordSource = str | Path | Iterable[Mapping[str, Any]] | Any


@dataclass(frozen=True)
class SweepRecords:
    """Validated records as columns.

    Attributes:
        k: number of merged experts per record (int).
        ce: cross-entropy per record (nats/token).
        N: base size in billions, NaN for every record when the sweep carries no sizes.
        fields: other scalar columns (``method``, ``domain``, ...) as object arrays.
        dropped: rows removed during validation, counted by reason.
        n_read: rows read before validation.
        subsets: each record's experts as a sorted tuple of names (None where not given).
    """

    k: np.ndarray
    ce: np.ndarray
    N: np.ndarray
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    n_read: int = 0
    subsets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.k.size)

    @property
    def has_sizes(self) -> bool:
        return bool(np.isfinite(self.N).any())

    @property
    def pool_size(self) -> int | None:
        """Experts in the pool: distinct names in the records' subsets (the most at any size),
        None when the records name no subsets."""
        if self.subsets is None or all(s is None for s in self.subsets):
            return None
        per_size: dict[float, set[str]] = {}
        for size, subset in zip(self.N, self.subsets, strict=True):
            per_size.setdefault(float(size) if np.isfinite(size) else -1.0, set()).update(
                subset or ()
            )
        return max(len(names) for names in per_size.values())

    def select(self, mask: np.ndarray) -> SweepRecords:
        """The subset of records where ``mask`` holds (drop counts are kept)."""
        return SweepRecords(
            self.k[mask],
            self.ce[mask],
            self.N[mask],
            {name: col[mask] for name, col in self.fields.items()},
            self.dropped,
            self.n_read,
            None if self.subsets is None else self.subsets[mask],
        )

    def groups(self, by: Sequence[str]) -> list[tuple[dict[str, Any], SweepRecords]]:
        """Split by the values of ``by`` fields (``"N"`` allowed); missing values group as None."""
        if not by:
            return [({}, self)]
        columns = []
        for name in by:
            if name == "N":
                columns.append([None if math.isnan(v) else float(v) for v in self.N])
            elif name in self.fields:
                columns.append(list(self.fields[name]))
            else:
                raise RecordsError(
                    f"cannot group by {name!r}: no record has that field "
                    f"(fields present: {[*sorted(self.fields), 'N', 'k', 'ce']})"
                )
        keys = list(zip(*columns, strict=True))
        out = []
        for key in sorted(set(keys), key=_group_order):
            mask = np.array([kk == key for kk in keys])
            out.append((dict(zip(by, key, strict=True)), self.select(mask)))
        return out


def _group_order(key: tuple[Any, ...]) -> tuple[tuple[int, float, str], ...]:
    # Sizes sort numerically, names alphabetically, missing values last.
    return tuple(
        (2, 0.0, "")
        if v is None
        else (0, float(v), "")
        if isinstance(v, float)
        else (1, 0.0, str(v))
        for v in key
    )


@dataclass(frozen=True)
class CellTable:
    """Per-(N, k) aggregates of one group, the points a law is fitted to.

    ``var`` is the sample variance across subsets (ddof=1), NaN for single-subset cells;
    ``values`` keeps each cell's raw CEs for the bootstrap.
    """

    N: np.ndarray
    k: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    n: np.ndarray
    values: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return int(self.k.size)

    @property
    def x(self) -> dict[str, np.ndarray]:
        return {"N": self.N, "k": self.k.astype(float)}

    def select(self, mask: np.ndarray) -> CellTable:
        kept = np.flatnonzero(mask)
        return CellTable(
            self.N[mask],
            self.k[mask],
            self.mean[mask],
            self.var[mask],
            self.n[mask],
            tuple(self.values[i] for i in kept),
        )


def at_size(sizes: np.ndarray, size: float | None) -> np.ndarray:
    """Where ``sizes`` equal ``size`` (to rounding); a missing size (None or NaN) matches NaN."""
    sizes = np.asarray(sizes, dtype=float)
    if size is None or np.isnan(size):
        return np.isnan(sizes)
    return np.isclose(sizes, size)


def make_cells(records: SweepRecords) -> CellTable:
    """Aggregate records into cells, one per distinct (N, k), sorted by N then k."""
    n_key = np.where(np.isfinite(records.N), records.N, -1.0)
    order = np.lexsort((records.k, n_key))
    n_sorted, k_sorted, ce_sorted = n_key[order], records.k[order], records.ce[order]
    change = np.flatnonzero((np.diff(n_sorted) != 0) | (np.diff(k_sorted) != 0)) + 1
    starts = np.concatenate([[0], change])
    values = tuple(np.split(ce_sorted, change))
    counts = np.array([v.size for v in values])
    var = np.array([v.var(ddof=1) if v.size > 1 else np.nan for v in values])
    return CellTable(
        N=np.where(n_sorted[starts] < 0, np.nan, n_sorted[starts]),
        k=k_sorted[starts],
        mean=np.array([v.mean() for v in values]),
        var=var,
        n=counts,
        values=values,
    )


def load_records(source: RecordSource, *, strict: bool = False) -> SweepRecords:
    """Read and validate sweep records from a path, a list of dicts or a pandas DataFrame.

    Args:
        source: ``.jsonl``/``.ndjson``/``.json``/``.csv`` path, an iterable of mappings, or a
            DataFrame (duck-typed, so pandas is never imported here).
        strict: raise :class:`RecordsError` on the first kind of invalid row instead of
            dropping and counting.

    Raises:
        RecordsError: unreadable file, no usable rows, sizes given in raw parameters, or (strict)
            any invalid row.
    """
    dropped: Counter[str] = Counter()
    rows = list(_read_rows(source, dropped))
    n_read = len(rows)
    if not rows and not dropped:
        raise RecordsError(f"no records in {_describe(source)}: expected objects with 'k' and 'ce'")
    records = _validate(rows, dropped, n_read)
    if strict and records.dropped:
        raise RecordsError(f"invalid records (strict mode): {describe_dropped(records)}")
    if len(records) == 0:
        raise RecordsError(
            f"no valid records in {_describe(source)}: {describe_dropped(records)}; "
            "each record needs an integer k >= 1 and a finite ce >= 0"
        )
    return records


def describe_dropped(records: SweepRecords) -> str:
    """``"dropped 3 of 120 records: 2 ce is NaN or infinite, 1 k < 1"`` (empty if none)."""
    if not records.dropped:
        return ""
    total = sum(records.dropped.values())
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(records.dropped.items()))
    return f"dropped {total} of {records.n_read} records: {parts}"


def _describe(source: RecordSource) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the given records"


def _read_rows(source: RecordSource, dropped: Counter[str]) -> Iterable[Mapping[str, Any]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise RecordsError(f"records file {path} does not exist")
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as fh:
                return list(csv.DictReader(fh))
        if path.suffix.lower() == ".json":
            return _json_document(path.read_text(), path)
        return [row for _, row in read_jsonl(path)]
    if hasattr(source, "to_dict") and hasattr(source, "columns"):
        return source.to_dict("records")
    if isinstance(source, Mapping):
        raise RecordsError("records must be a list of dicts, not a single dict")
    rows = list(source)
    bad = sum(not isinstance(r, Mapping) for r in rows)
    if bad:
        raise RecordsError(f"{bad} of {len(rows)} records are not dicts")
    return rows


def _json_document(text: str, path: Path) -> list[Mapping[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordsError(
            f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); "
            "use .jsonl for one object per line"
        ) from None
    if isinstance(data, Mapping) and isinstance(data.get("records"), list):
        data = data["records"]
    if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
        raise RecordsError(f"{path} must hold a list of records or {{'records': [...]}}")
    return data


def _number(value: Any) -> float | None:
    """float(value); None when missing; NaN when present but not a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _row_problem(k: float | None, ce: float | None, subset: Any) -> str | None:
    if k is None or ce is None:
        return "missing k or ce"
    if math.isnan(k):
        return "k is not a number"
    if not math.isfinite(ce):
        return "ce is NaN or infinite"
    if ce < 0:
        return "ce is negative"
    if k < 1:
        return "k < 1"
    if k != int(k):
        return "k is not an integer"
    if isinstance(subset, (list, tuple)) and len(subset) != k:
        return "k differs from the subset size"
    return None


def _validate(rows: list[Mapping[str, Any]], dropped: Counter[str], n_read: int) -> SweepRecords:
    ks, ces, sizes, kept = [], [], [], []
    seen: set[tuple[Any, ...]] = set()
    any_size = any(_number(r.get("N")) is not None for r in rows)
    for row in rows:
        k, ce, size = _number(row.get("k")), _number(row.get("ce")), _number(row.get("N"))
        subset = row.get("subset")
        problem = _row_problem(k, ce, subset)
        if problem is None and any_size and (size is None or not size > 0):
            problem = "N missing or not a positive number"
        if problem is None and subset is not None:
            identity = (
                row.get("method"),
                _params_key(row),
                row.get("domain"),
                size,
                k,
                tuple(sorted(map(str, subset))) if isinstance(subset, (list, tuple)) else subset,
            )
            problem = "duplicate subset" if identity in seen else None
            seen.add(identity)
        if problem:
            dropped[problem] += 1
            continue
        ks.append(int(k))
        ces.append(ce)
        sizes.append(size if size is not None else math.nan)
        kept.append(row)
    _refuse_mixed_params(kept)
    size_arr = np.array(sizes, dtype=float)
    if np.nanmax(size_arr, initial=0.0) > _MAX_SIZE_BILLIONS:
        raise RecordsError(
            f"N = {np.nanmax(size_arr):.3g} looks like a raw parameter count; N is in billions "
            "of parameters (write 7 for a 7B model)"
        )
    subsets = np.empty(len(kept), dtype=object)
    subsets[:] = [
        tuple(sorted(map(str, r["subset"]))) if isinstance(r.get("subset"), list | tuple) else None
        for r in kept
    ]
    return SweepRecords(
        k=np.array(ks, dtype=int),
        ce=np.array(ces, dtype=float),
        N=size_arr,
        fields=_scalar_fields(kept),
        dropped=dict(dropped),
        n_read=n_read,
        subsets=subsets,
    )


def _params_key(row: Mapping[str, Any]) -> str | None:
    params = row.get("params")
    return None if params is None else json.dumps(params, sort_keys=True, default=str)


def _refuse_mixed_params(rows: list[Mapping[str, Any]]) -> None:
    """One method label, one parameter set: a fit must not average two methods' curves."""
    seen: dict[Any, set[str]] = {}
    for row in rows:
        if (key := _params_key(row)) is not None:
            seen.setdefault(row.get("method"), set()).add(key)
    mixed = {method: sorted(keys) for method, keys in seen.items() if len(keys) > 1}
    if mixed:
        method, keys = next(iter(mixed.items()))
        raise RecordsError(
            f"the records of method {method!r} were measured with {len(keys)} parameter sets "
            f"({'; '.join(keys)}); fit them separately, or give each setting its own label in "
            "the sweep (methods: [{name: ties, density: 0.2, label: ties-d02}, ...])."
        )


def _scalar_fields(rows: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    # Grouping columns are strings (method, domain...); numbers, lists and the core fields are not.
    names = {n for r in rows for n, v in r.items() if isinstance(v, str)}
    names -= {"k", "ce", "N", "subset", "num_tokens"}
    out = {}
    for name in sorted(names):
        col = np.empty(len(rows), dtype=object)
        col[:] = [
            r.get(name) if isinstance(r.get(name), str) and r.get(name) else None for r in rows
        ]
        out[name] = col
    return out
