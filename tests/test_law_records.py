"""Reading, validating, grouping and aggregating sweep records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hf_mergelaw.errors import RecordsError, RecordsFileError
from hf_mergelaw.law import load_records
from hf_mergelaw.law.records import describe_dropped, make_cells

ROWS = [
    {"k": 1, "ce": 0.90, "N": 7, "method": "ties", "domain": "code", "subset": ["a"]},
    {"k": 1, "ce": 0.80, "N": 7, "method": "ties", "domain": "code", "subset": ["b"]},
    {"k": 2, "ce": 0.75, "N": 7, "method": "ties", "domain": "code", "subset": ["a", "b"]},
    {"k": 2, "ce": 0.70, "N": 0.5, "method": "average", "domain": "code", "num_tokens": 10},
]


def _check(records) -> None:
    assert len(records) == 4
    np.testing.assert_array_equal(records.k, [1, 1, 2, 2])
    np.testing.assert_allclose(records.N, [7, 7, 7, 0.5])
    assert list(records.fields["method"]) == ["ties", "ties", "ties", "average"]
    assert records.dropped == {}


def test_sources_agree(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    doc = tmp_path / "r.json"
    doc.write_text(json.dumps({"records": ROWS}))
    csv_path = tmp_path / "r.csv"
    pd.DataFrame(ROWS).drop(columns="subset").to_csv(csv_path, index=False)
    for source in (ROWS, jsonl, str(jsonl), doc, csv_path, pd.DataFrame(ROWS)):
        _check(load_records(source))


def test_invalid_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    bad = [
        {"k": 1, "ce": math.nan},
        {"k": 1, "ce": -0.1},
        {"k": 0, "ce": 0.5},
        {"k": 2.5, "ce": 0.5},
        {"k": 2, "ce": "oops"},
        {"ce": 0.5},
        {"k": 2, "ce": 0.5, "subset": ["a"]},
        {"k": 1, "ce": 0.9, "N": 7, "method": "ties", "domain": "code", "subset": ["a"]},
        {"k": 1, "ce": 0.9},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS + bad))
    records = load_records(path)
    assert records.dropped == {
        "ce is NaN or infinite": 2,  # NaN and a non-number string
        "ce is negative": 1,
        "k < 1": 1,
        "k is not an integer": 1,
        "missing k or ce": 1,
        "k differs from the subset size": 1,
        "duplicate subset": 1,
        "N missing or not a positive number": 1,
    }
    assert len(records) == 4
    assert records.n_read == len(ROWS) + len(bad)
    text = describe_dropped(records)
    assert text.startswith(f"dropped 9 of {records.n_read} records:")
    assert "1 duplicate subset" in text
    with pytest.raises(RecordsError, match=r"strict mode.*ce is negative"):
        load_records(path, strict=True)


def test_a_line_cut_short_at_the_end_is_a_write_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"k": 3, "ce"')
    assert len(load_records(path)) == len(ROWS)


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"k": 1'])
def test_a_malformed_line_before_the_end_names_file_and_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(f"{json.dumps(ROWS[0])}\n{line}\n{json.dumps(ROWS[1])}\n")
    with pytest.raises(RecordsFileError, match=r"r.jsonl:2 is a JSON list|r.jsonl:2 is not a JSON"):
        load_records(path)


def test_nothing_valid_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match=r"no valid records.*1 k < 1"):
        load_records([{"k": 0, "ce": 1.0}])
    with pytest.raises(RecordsError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(RecordsError, match="no records"):
        load_records([])
    broken = tmp_path / "r.json"
    broken.write_text("{")
    with pytest.raises(RecordsError, match="not valid JSON"):
        load_records(broken)
    with pytest.raises(RecordsError, match="not dicts"):
        load_records([1, 2])


def test_raw_parameter_counts_are_refused() -> None:
    with pytest.raises(RecordsError, match="billions"):
        load_records([{"k": 1, "ce": 0.5, "N": 7e9}, {"k": 2, "ce": 0.4, "N": 7e9}])


def test_groups_and_cells() -> None:
    records = load_records(ROWS)
    groups = records.groups(["method", "N"])
    assert [g for g, _ in groups] == [{"method": "average", "N": 0.5}, {"method": "ties", "N": 7.0}]
    ties = groups[1][1]
    cells = make_cells(ties)
    np.testing.assert_array_equal(cells.k, [1, 2])
    np.testing.assert_allclose(cells.mean, [0.85, 0.75])
    np.testing.assert_allclose(cells.var[0], np.var([0.9, 0.8], ddof=1))
    assert math.isnan(cells.var[1])
    np.testing.assert_array_equal(cells.n, [2, 1])
    with pytest.raises(RecordsError, match="cannot group by 'seed'"):
        records.groups(["seed"])


def test_sizes_sort_numerically() -> None:
    rows = [{"k": 1, "ce": 1.0, "N": n} for n in (14, 1.5, 72, 0.5)]
    assert [g["N"] for g, _ in load_records(rows).groups(["N"])] == [0.5, 1.5, 14, 72]
