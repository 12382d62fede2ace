"""A sweep's records as pools: one group's merges as rows of "which experts, what CE".

Groups follow ``hf-mergelaw fit --by``: each record's per-domain CEs become rows of their own
(:func:`~hf_mergelaw.record_schema.records_by_domain`), so ``by=("method", "domain")`` gives the
cross-domain ``macro`` pool of each method beside each domain's::

    groups = pool_records("results.jsonl", by=("method", "domain"))
    groups[0].group, groups[0].experts, groups[0].members.shape   # {...}, ("a", ...), (n, M)

Every record must name its subset; a record that cannot be used is an error naming its line
(nothing is dropped silently), as are two records of the same subset in one group and records of
several base sizes in a group not split by ``N``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import read_jsonl
from ..record_schema import records_by_domain
from .errors import PoolModelError

DEFAULT_BY = ("method", "domain")
# Fields two rows of one subset may differ in; naming the one that differs tells the user which
# field to add to --by.
_SPLITTING_FIELDS = ("method", "domain", "N", "params", "seed")


@dataclass(frozen=True)
class PoolRecords:
    """The merges of one group: ``members[r, i]`` says whether record r merged expert i.

    ``experts`` are sorted names; ``lines`` the records' line numbers in the file (their index in
    a list when read from one), for messages.
    """

    group: dict[str, Any]
    experts: tuple[str, ...]
    members: np.ndarray
    ce: np.ndarray
    lines: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.ce.size)

    @property
    def k(self) -> np.ndarray:
        return self.members.sum(axis=1)

    def subsets(self) -> list[tuple[str, ...]]:
        return [tuple(np.asarray(self.experts)[row]) for row in self.members]

    def label(self) -> str:
        return "group " + (", ".join(f"{k}={v}" for k, v in self.group.items()) or "all")


def pool_records(
    source: str | Path | Iterable[Mapping[str, Any]],
    *,
    by: Sequence[str] = DEFAULT_BY,
    experts: Sequence[str] | None = None,
) -> list[PoolRecords]:
    """Read a sweep's records (a JSON-lines file or the records as a sweep writes them) and split
    them into pools by ``by``.

    Args:
        source: the sweep's ``.jsonl`` file, or its records (each with its ``per_domain`` CEs;
            not rows already expanded by ``records_by_domain``).
        by: grouping fields; ``N`` is allowed and needed when the records hold several sizes.
        experts: the pool, when known; records naming anyone else are refused, and so is an
            expert no record merged. Default: every name the group's records merge.

    Raises:
        PoolModelError: a record without a usable subset or CE, an expert outside ``experts``,
            one subset recorded twice in a group, mixed sizes or parameters in one group.
    """
    rows = records_by_domain(_read(source))
    buckets: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = tuple(_group_value(row, name) for name in by)
        buckets.setdefault(key, []).append(row)
    out = []
    for key in sorted(buckets, key=_group_order):
        group = dict(zip(by, key, strict=True))
        out.append(_one_pool(group, buckets[key], by, experts))
    return out


def _read(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PoolModelError(f"records file {path} does not exist; give a sweep's .jsonl file.")
        rows = [{**record, "_line": number} for number, record in read_jsonl(path)]
    else:
        rows = [{**record, "_line": number} for number, record in enumerate(source, 1)]
    if not rows:
        raise PoolModelError(f"no records in {source}: run a sweep first.")
    return rows


def _group_value(row: Mapping[str, Any], name: str) -> Any:
    value = row.get(name)
    if name == "N" and value is not None:
        return float(value)
    return value if isinstance(value, str | int | float) and not isinstance(value, bool) else None


def _group_order(key: tuple[Any, ...]) -> tuple[tuple[int, float, str], ...]:
    # Numbers sort numerically, names alphabetically, missing values last (as `fit` sorts).
    return tuple(
        (2, 0.0, "")
        if v is None
        else (0, float(v), "")
        if isinstance(v, int | float)
        else (1, 0.0, str(v))
        for v in key
    )


def _one_pool(
    group: dict[str, Any],
    rows: list[dict[str, Any]],
    by: Sequence[str],
    declared: Sequence[str] | None,
) -> PoolRecords:
    label = "group " + (", ".join(f"{k}={v}" for k, v in group.items()) or "all")
    subsets = [_subset(row) for row in rows]
    ces = [_ce(row) for row in rows]
    _refuse_mixed(rows, by, label)
    _refuse_duplicates(rows, subsets, by, label)
    names = sorted({name for subset in subsets for name in subset})
    if declared is not None:
        pool = sorted(set(declared))
        for row, subset in zip(rows, subsets, strict=True):
            outside = sorted(set(subset) - set(pool))
            if outside:
                raise PoolModelError(
                    f"line {row['_line']} ({label}) merges {', '.join(outside)}, outside the "
                    f"pool ({', '.join(pool)}); add them to the pool or drop those records."
                )
        unmerged = sorted(set(pool) - set(names))
        if unmerged:
            raise PoolModelError(
                f"{label}: no record merges {', '.join(unmerged)}; merge subsets containing "
                "them, or leave them out of the pool."
            )
        names = pool
    column = {name: i for i, name in enumerate(names)}
    members = np.zeros((len(rows), len(names)), dtype=bool)
    for r, subset in enumerate(subsets):
        members[r, [column[name] for name in subset]] = True
    return PoolRecords(
        group=group,
        experts=tuple(names),
        members=members,
        ce=np.array(ces, dtype=float),
        lines=tuple(int(row["_line"]) for row in rows),
    )


def _subset(row: Mapping[str, Any]) -> tuple[str, ...]:
    subset = row.get("subset")
    where = f"line {row['_line']}"
    if not isinstance(subset, list | tuple) or not subset:
        raise PoolModelError(
            f"{where} names no subset; the pool model needs each merge's experts "
            '("subset": ["a", "b"]), as a sweep records them.'
        )
    names = [str(name) for name in subset]
    if len(set(names)) != len(names):
        raise PoolModelError(f"{where} merges an expert twice ({names}); fix that record.")
    k = row.get("k")
    if k is not None and k != len(names):
        raise PoolModelError(
            f"{where} says k={k} but merges {len(names)} experts; fix that record."
        )
    return tuple(sorted(names))


def _ce(row: Mapping[str, Any]) -> float:
    value = row.get("ce")
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise PoolModelError(
            f"line {row['_line']} (domain {row.get('domain')}) has ce={value!r}; every merge "
            "needs a finite cross-entropy >= 0. Fix or remove that record."
        )
    return float(value)


def _refuse_mixed(rows: list[dict[str, Any]], by: Sequence[str], label: str) -> None:
    sizes = {float(row["N"]) for row in rows if row.get("N") is not None}
    if len(sizes) > 1 and "N" not in by:
        shown = ", ".join(f"{size:g}" for size in sorted(sizes))
        raise PoolModelError(
            f"{label} mixes records of {len(sizes)} base sizes (N = {shown}); one pool is one "
            "base's experts: add N to --by (e.g. --by method,domain,N)."
        )
    params = {_params_key(row) for row in rows}
    if len(params) > 1 and "params" not in by:
        raise PoolModelError(
            f"{label} mixes {len(params)} parameter sets of one method "
            f"({'; '.join(sorted(params))}); give each setting its own label in the sweep, or "
            "fit them separately."
        )


def _refuse_duplicates(
    rows: list[dict[str, Any]], subsets: list[tuple[str, ...]], by: Sequence[str], label: str
) -> None:
    first: dict[tuple[str, ...], dict[str, Any]] = {}
    for row, subset in zip(rows, subsets, strict=True):
        if subset not in first:
            first[subset] = row
            continue
        other = first[subset]
        differ = [
            name
            for name in _SPLITTING_FIELDS
            if name not in by and _params_key(row, name) != _params_key(other, name)
        ]
        fix = (
            f"they differ in {', '.join(differ)}: add it to --by"
            if differ
            else "remove one of them (a sweep records each merge once; re-run it with --restart "
            "to start over)"
        )
        where = (
            f"line {row['_line']} (as two domains' rows)"
            if row["_line"] == other["_line"]
            else f"lines {other['_line']} and {row['_line']}"
        )
        raise PoolModelError(
            f"{label}: subset {','.join(subset)} is recorded twice ({where}); {fix}."
        )


def _params_key(row: Mapping[str, Any], name: str = "params") -> str:
    return json.dumps(row.get(name), sort_keys=True, default=str)
