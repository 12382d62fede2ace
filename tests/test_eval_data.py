"""`load_eval_columns`: a sweep's held-out data from JSON lines, JSON or `datasets`, offline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pytest
from datasets import Dataset, DatasetDict

from hf_mergelaw.errors import RecordsFileError, SweepConfigError
from hf_mergelaw.eval_data import load_eval_columns
from hf_mergelaw.sweep_config import EvalConfig
from tests.tiny_models import SENTENCES, write_jsonl

TEXTS = list(SENTENCES[:4])
DOMAINS = ["animals", "animals", "math", "code"]


def _config(data: Path | str, **fields: Any) -> EvalConfig:
    return EvalConfig(data=str(data), **fields)


def _text_rows() -> list[dict[str, str]]:
    return [{"text": text, "domain": domain} for text, domain in zip(TEXTS, DOMAINS, strict=True)]


# --- JSON lines -----------------------------------------------------------------------------


def test_jsonl_texts_with_domains(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", _text_rows())
    columns = load_eval_columns(_config(path, text_field="text", domain_field="domain"))
    assert columns == {"texts": TEXTS, "prompts": None, "responses": None, "domains": DOMAINS}


def test_jsonl_prompt_response_pairs(tmp_path: Path) -> None:
    rows = [{"q": "two plus two", "a": "four"}, {"q": "capital of france", "a": "paris"}]
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    columns = load_eval_columns(_config(path, prompt_field="q", response_field="a"))
    assert columns == {
        "texts": None,
        "prompts": ["two plus two", "capital of france"],
        "responses": ["four", "paris"],
        "domains": None,
    }


def test_max_samples_keeps_the_first_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", _text_rows())
    columns = load_eval_columns(_config(path, text_field="text", max_samples=2))
    assert columns["texts"] == TEXTS[:2]


def test_missing_field_names_the_record_and_its_fields(tmp_path: Path) -> None:
    rows = [{"text": "a b c"}, {"body": "d e f", "domain": "x"}]
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(SweepConfigError) as error:
        load_eval_columns(_config(path, text_field="text"))
    message = str(error.value)
    assert "record 1 has no field 'text'" in message
    assert "eval.text_field" in message and "(body, domain)" in message


def test_empty_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text("")
    with pytest.raises(SweepConfigError, match="is empty"):
        load_eval_columns(_config(path, text_field="text"))


def test_malformed_line_in_the_middle_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n{"text": "c"}\n')
    with pytest.raises(RecordsFileError, match=re.escape(f"{path}:2 is not a JSON record")):
        load_eval_columns(_config(path, text_field="text"))


def test_last_line_cut_short_without_newline_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c')
    assert load_eval_columns(_config(path, text_field="text"))["texts"] == ["a", "b"]


# --- JSON -----------------------------------------------------------------------------------


def test_json_file_holding_a_list_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(_text_rows()))
    columns = load_eval_columns(_config(path, text_field="text", domain_field="domain"))
    assert (columns["texts"], columns["domains"]) == (TEXTS, DOMAINS)


@pytest.mark.parametrize(
    "document",
    [{"text": "a b c"}, ["a b c", "d e f"]],
    ids=["an-object", "a-list-of-strings"],
)
def test_json_file_that_is_not_a_list_of_objects_is_refused(document: Any, tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(document))
    with pytest.raises(SweepConfigError, match="must hold a JSON list of objects"):
        load_eval_columns(_config(path, text_field="text"))


# --- datasets -------------------------------------------------------------------------------


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    Dataset.from_list(_text_rows()).save_to_disk(tmp_path / "eval")
    columns = load_eval_columns(_config(tmp_path / "eval", text_field="text"))
    assert columns["texts"] == TEXTS


def test_dataset_dict_saved_to_disk_reads_the_validation_split(tmp_path: Path) -> None:
    splits = DatasetDict(
        train=Dataset.from_dict({"text": ["only for training"]}),
        validation=Dataset.from_dict({"text": TEXTS}),
    )
    splits.save_to_disk(tmp_path / "eval")
    assert load_eval_columns(_config(tmp_path / "eval", text_field="text"))["texts"] == TEXTS


def test_dataset_dict_without_the_split_is_refused(tmp_path: Path) -> None:
    DatasetDict(train=Dataset.from_dict({"text": TEXTS})).save_to_disk(tmp_path / "eval")
    with pytest.raises(SweepConfigError, match="could not be loaded"):
        load_eval_columns(_config(tmp_path / "eval", text_field="text"))


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(SweepConfigError, match=re.escape(f"eval data {path} does not exist")):
        load_eval_columns(_config(path, text_field="text"))


def test_name_of_no_dataset_available_offline_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables at import time; set their switches too (no retries).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "hf-mergelaw-tests/no-such-dataset"
    with pytest.raises(SweepConfigError) as error:
        load_eval_columns(_config(name, text_field="text"))
    message = str(error.value)
    assert f"eval data {name!r} could not be loaded" in message
    assert "save_to_disk" in message
