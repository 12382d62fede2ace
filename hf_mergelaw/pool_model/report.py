"""Every group's pool model of a sweep, and its JSON file (``hf-mergelaw pool fit -o``).

The file is ``{"format_version": 1, "kind": "pool-model", "by": [...], "pools": [...]}``; each
pool holds what :meth:`PoolModel.to_dict` writes plus, for reading, ``leave_one_out`` (R^2 of the
within-k deviations and interval coverage of each record predicted from the others),
``pool_curve`` (:func:`~.expectation.pool_curve`) and ``law``, the floor and tail of that curve
(:func:`~.expectation.pool_law`)::

    report.save("pool.json")
    PoolReport.load("pool.json").pools[0].predict([("a", "b")])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import read_json, write_json
from .accuracy import coverage, within_k_r2
from .errors import PoolModelError
from .expectation import pool_curve, pool_law
from .model import FORMAT_VERSION, PoolModel

KIND = "pool-model"


@dataclass(frozen=True)
class PoolReport:
    """The fitted pools, in group order, and the fields they were grouped by."""

    pools: list[PoolModel]
    by: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "by": list(self.by),
            "pools": [
                {
                    **model.to_dict(),
                    "leave_one_out": leave_one_out(model),
                    "pool_curve": [point.to_dict() for point in pool_curve(model)],
                    "law": pool_law(model),
                }
                for model in self.pools
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the pool data") -> PoolReport:
        if not isinstance(data, Mapping) or data.get("kind") != KIND:
            raise PoolModelError(
                f"{source} is not a pool-model file; write one with `hf-mergelaw pool fit "
                "RECORDS -o POOL.json`."
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise PoolModelError(
                f"{source} has format_version {data.get('format_version')}; this version reads "
                f"{FORMAT_VERSION}. Refit it with `hf-mergelaw pool fit`."
            )
        return cls(
            pools=[PoolModel.from_dict(pool) for pool in data["pools"]], by=tuple(data["by"])
        )

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PoolReport:
        return cls.from_dict(read_json(path, "pool file"), str(path))

    def select(self, group: Mapping[str, Any]) -> list[PoolModel]:
        """The pools whose group has these values (compared as text); an error if none."""
        chosen = [
            model
            for model in self.pools
            if all(str(model.group.get(key)) == str(value) for key, value in group.items())
        ]
        if not chosen:
            shown = "; ".join(model.label() for model in self.pools)
            raise PoolModelError(f"no pool matches {dict(group)}; the file holds: {shown}.")
        return chosen


def leave_one_out(model: PoolModel) -> dict[str, float]:
    """How well each fitted record is predicted from the others (at the chosen prior scales)."""
    records, t = model.records, model.t_value()
    # Records that alone pin a parameter (the one merge of a size) have no such prediction.
    ok = np.isfinite(records.loo_mean)
    if not ok.any():  # a geometry model no merge calibrated
        nan = float("nan")
        return {"records": 0, "r2_within_k": nan, "coverage": nan, "level": model.level}
    ce, mean, sd = records.ce[ok], records.loo_mean[ok], records.loo_sd[ok]
    return {
        "records": int(ok.sum()),
        "r2_within_k": within_k_r2(ce, mean, records.k[ok]),
        "coverage": coverage(ce, mean - t * sd, mean + t * sd),
        "level": model.level,
    }
