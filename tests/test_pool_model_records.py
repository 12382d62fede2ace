"""Sweep records as pools: grouping like `hf-mergelaw fit`, and every refusal with its fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_mergelaw.pool_model import (
    PoolModelError,
    fit_pool,
    fit_pools,
    pool_records,
    required_records,
    synthetic_pool,
)
from hf_mergelaw.subsets import sample_subsets

M = 6


def design(per_k: int = 6, ks: range = range(1, M + 1)) -> list[tuple]:
    return [s for k in ks for s in sample_subsets(M, k, strategy="balanced", per_k=per_k)]


def sweep_records(per_k: int = 6) -> list[dict]:
    """Records as a sweep writes them: the macro CE and two domains' CEs."""
    one, two = synthetic_pool(M, seed=0), synthetic_pool(M, seed=1)
    rows = []
    for a, b in zip(one.records(design(per_k)), two.records(design(per_k)), strict=True):
        per_domain = {"code": {"ce": a["ce"], "num_tokens": 10}, "math": {"ce": b["ce"]}}
        rows.append({**a, "ce": (a["ce"] + b["ce"]) / 2, "per_domain": per_domain})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_groups_are_each_methods_macro_pool_and_each_domains():
    rows = sweep_records()
    rows += [{**row, "method": "ties"} for row in rows]
    groups = pool_records(rows)
    assert [g.group for g in groups] == [
        {"method": method, "domain": domain}
        for method in ("average", "ties")
        for domain in ("code", "macro", "math")
    ]
    code = groups[0]
    assert code.experts == tuple(f"e{i:02d}" for i in range(M))
    assert code.members.shape == (len(design()), M)
    assert code.ce[0] == rows[0]["per_domain"]["code"]["ce"]
    assert list(code.k) == [len(r["subset"]) for r in rows[: len(design())]]


def test_a_records_file_reads_like_the_list(tmp_path):
    rows = sweep_records()
    path = write_jsonl(tmp_path / "sweep.jsonl", rows)
    from_file, from_list = pool_records(path), pool_records(rows)
    assert [g.group for g in from_file] == [g.group for g in from_list]
    assert np.array_equal(from_file[1].ce, from_list[1].ce)
    assert from_file[1].lines[:2] == (1, 2)


def test_several_sizes_split_by_n():
    rows = sweep_records()
    rows += [{**row, "N": 7.0} for row in rows]
    with pytest.raises(PoolModelError, match=r"mixes records of 2 base sizes.*add N to --by"):
        pool_records(rows)
    groups = pool_records(rows, by=("method", "domain", "N"))
    assert {g.group["N"] for g in groups} == {0.001, 7.0}


def test_one_subset_recorded_twice_is_refused_with_the_lines():
    rows = sweep_records()
    rows.append(dict(rows[3]))
    last = len(rows)
    with pytest.raises(PoolModelError, match=rf"recorded twice \(lines 4 and {last}\).*remove one"):
        pool_records(rows)


def test_rows_of_several_domains_in_one_group_say_to_group_by_domain():
    with pytest.raises(PoolModelError, match=r"recorded twice.*differ in domain: add it to --by"):
        pool_records(sweep_records(), by=("method",))


def test_experts_outside_the_declared_pool_are_refused():
    with pytest.raises(PoolModelError, match=r"merges e05, outside the pool .*add them"):
        pool_records(sweep_records(), experts=[f"e{i:02d}" for i in range(5)])
    with pytest.raises(PoolModelError, match=r"no record merges extra"):
        pool_records(sweep_records(), experts=[*(f"e{i:02d}" for i in range(M)), "extra"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subset": None}, "names no subset"),
        ({"subset": ["e00", "e00"]}, "merges an expert twice"),
        ({"k": 3}, "says k=3 but merges"),
        ({"ce": float("nan")}, "finite cross-entropy"),
        ({"ce": "low"}, "finite cross-entropy"),
    ],
)
def test_a_record_that_cannot_be_used_is_named_by_its_line(change, message):
    rows = sweep_records()
    rows[4] = {**rows[4], **change}
    rows[4].pop("per_domain")
    with pytest.raises(PoolModelError, match=rf"line 5 .*{message}"):
        pool_records(rows)


def test_mixed_parameters_of_one_method_are_refused():
    rows = sweep_records()
    rows[0] = {**rows[0], "params": {"density": 0.5}}
    with pytest.raises(PoolModelError, match="mixes 2 parameter sets"):
        pool_records(rows)


def test_a_missing_or_empty_file_is_an_error(tmp_path):
    with pytest.raises(PoolModelError, match="does not exist"):
        pool_records(tmp_path / "none.jsonl")
    with pytest.raises(PoolModelError, match="no records"):
        pool_records(write_jsonl(tmp_path / "empty.jsonl", []))


def one_group(rows: list[dict]):
    (group,) = [g for g in pool_records(rows) if g.group["domain"] == "macro"]
    return group


def test_merges_of_a_single_size_are_refused():
    rows = [r for r in sweep_records() if r["k"] in (3, M)]
    with pytest.raises(PoolModelError, match=r"one size only \(k=3 \(6 merges\).*another size"):
        fit_pool(one_group(rows))


def test_too_few_merges_say_how_many_more():
    rows = sweep_records(per_k=2)
    needed = required_records(M, M)
    group = one_group(rows)
    with pytest.raises(
        PoolModelError, match=rf"needs at least {needed}.*Merge {needed - len(group)} more"
    ):
        fit_pool(group)


def test_an_expert_in_every_merge_is_refused():
    pool = synthetic_pool(M, seed=0)
    subsets = [s for s in design(per_k=20, ks=range(2, M + 1)) if 0 in s]
    with pytest.raises(PoolModelError, match="e00 is in every merge"):
        fit_pool(pool_records(pool.records(subsets))[0])


def test_an_unfittable_group_fails_the_whole_fit(tmp_path):
    """Nothing is returned for the other groups either."""
    rows = sweep_records()
    rows += [{**row, "method": "ties"} for row in rows if row["k"] == 2]
    with pytest.raises(PoolModelError, match="group method=ties, domain=code: merges of one size"):
        fit_pools(rows)


def test_unknown_curve_and_bad_level_are_refused():
    group = one_group(sweep_records())
    with pytest.raises(PoolModelError, match="curve 'spline'"):
        fit_pool(group, curve="spline")
    with pytest.raises(PoolModelError, match=r"level 1\.5"):
        fit_pool(group, level=1.5)
