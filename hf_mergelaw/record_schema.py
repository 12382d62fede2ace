"""What one sweep record holds, and the rows the law is fitted to.

One JSON line per merged model::

    {"method": "ties", "method_name": "ties", "params": {"density": 0.5, ...}, "k": 3,
     "subset": ["code", "math", "physics"], "N": 0.007, "ce": 2.31, "domain": "macro",
     "per_domain": {"code": {"ce": 2.10, "num_tokens": 5120}, ...}, "num_tokens": 30720,
     "seed": 0, "merge_s": 0.02, "eval_s": 0.4}

``method`` is the method's label (unique within a sweep), ``params`` every parameter resolved,
``N`` the base size in billions. With domains, ``ce`` is the cross-domain macro mean over domains
(domain :data:`CROSS_DOMAIN`) and ``per_domain`` holds each domain's CE; without, ``ce`` is the
token-weighted CE of the whole eval set (domain :data:`WHOLE_SET`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cross_entropy import CrossEntropy

CROSS_DOMAIN = "macro"
WHOLE_SET = "all"
# What every record of a sweep has; a file whose lines lack them is not a sweep's records file.
REQUIRED_FIELDS = ("method", "params", "k", "subset", "ce")


def job_key(label: str, params: Mapping[str, Any], subset: Sequence[str]) -> str:
    """What makes two records the same merge: a resumed sweep skips a job whose key is recorded."""
    return json.dumps([label, dict(params), list(subset)], sort_keys=True)


def record_key(record: Mapping[str, Any]) -> str:
    return job_key(record["method"], record["params"], record["subset"])


def make_record(
    *,
    label: str,
    method_name: str,
    params: Mapping[str, Any],
    subset: Sequence[str],
    measured: CrossEntropy,
    N: float,
    seed: int,
    timing: Mapping[str, float],
) -> dict[str, Any]:
    """One merged model's line (see the module docstring)."""
    record: dict[str, Any] = {
        "method": label,
        "method_name": method_name,
        "params": dict(params),
        "k": len(subset),
        "subset": list(subset),
        "N": N,
        "num_tokens": measured.num_tokens,
        "seed": seed,
        **timing,
    }
    if measured.per_domain:
        record["domain"] = CROSS_DOMAIN
        record["ce"] = measured.macro_cross_entropy
        record["per_domain"] = {
            domain: {"ce": value.cross_entropy, "num_tokens": value.num_tokens}
            for domain, value in measured.per_domain.items()
        }
    else:
        record["domain"] = WHOLE_SET
        record["ce"] = measured.cross_entropy
    return record


def records_by_domain(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the law fit: each per-domain CE becomes a row of its own (the in-domain curves)
    beside the record's own row (the cross-domain curve)."""
    rows = []
    for record in records:
        rows.append(dict(record))
        for domain, value in record.get("per_domain", {}).items():
            rows.append({**record, "domain": domain, **value})
    return rows
