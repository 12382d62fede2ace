"""MergeScalingCallback inside a real `Trainer.train()`: the trained model joins the pool.

Training is slow on the CPU, so one module-scoped run feeds every test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from hf_mergelaw import MergeScalingCallback
from hf_mergelaw.cross_entropy import build_eval_set
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.record_store import RecordStore
from tests.tiny_models import SENTENCES, save_family

RUN_NAME = "math-sft"
EXPERTS = ["expert0", "expert1", "expert2", RUN_NAME]
FITTED_KEYS = (
    "eval_merge_floor",
    "eval_merge_tail",
    "eval_merge_b",
    "eval_merge_r2",
    "eval_merge_next_expert_gain",
    "eval_merge_k_for_target",
)


@dataclass(frozen=True)
class FinishedRun:
    trainer: Trainer
    pool: ExpertPool
    output_dir: Path

    @property
    def merge_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.trainer.state.log_history if "eval_merge_pool_size" in row]

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(RecordStore(self.output_dir / "merge_scaling" / "results.jsonl"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    root = tmp_path_factory.mktemp("callback")
    base, experts = save_family(root / "family", num_experts=3)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pool = ExpertPool(base, experts, dtype=torch.float32)
    eval_set = build_eval_set(tokenizer, texts=list(SENTENCES), max_length=32)
    train = Dataset.from_dict({"text": list(SENTENCES) * 4}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        root / "run", max_steps=3, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", use_cpu=True, run_name=RUN_NAME,
    )  # fmt: skip
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    callback = MergeScalingCallback(trainer, pool, eval_set, strategy="all", target_loss=3.0)
    trainer.add_callback(callback)
    trainer.train()
    return FinishedRun(trainer, pool, root / "run")


def test_trained_model_joins_the_pool_under_the_run_name(run: FinishedRun) -> None:
    assert run.pool.names == EXPERTS


def test_one_row_of_merge_metrics_reaches_log_history(run: FinishedRun) -> None:
    assert len(run.merge_rows) == 1
    assert run.merge_rows[0]["eval_merge_pool_size"] == len(EXPERTS)


@pytest.mark.parametrize("key", FITTED_KEYS)
def test_logged_law_metric_is_finite(run: FinishedRun, key: str) -> None:
    (metrics,) = run.merge_rows
    assert key in metrics and math.isfinite(metrics[key])


def test_records_file_holds_every_subset_of_the_pool(run: FinishedRun) -> None:
    subsets = sorted(tuple(sorted(record["subset"])) for record in run.records)
    every = sorted(
        tuple(sorted(subset)) for k in range(1, 5) for subset in combinations(EXPERTS, k)
    )
    assert len(every) == 15
    assert subsets == every


def test_logged_ce_k4_equals_the_measured_record(run: FinishedRun) -> None:
    (metrics,) = run.merge_rows
    (k4,) = [record for record in run.records if record["k"] == 4]
    assert metrics["eval_merge_ce_k4"] == k4["ce"]


def test_pool_copy_of_the_trained_expert_is_not_the_live_training_tensor(
    run: FinishedRun,
) -> None:
    trained = dict(run.trainer.model.named_parameters())
    held = run.pool.experts[RUN_NAME].tensors
    assert set(held) == set(trained)
    for name, tensor in held.items():
        assert tensor.data_ptr() != trained[name].data_ptr(), name


def test_pool_copy_holds_the_trained_weights_as_a_task_vector(run: FinishedRun) -> None:
    trained = dict(run.trainer.model.named_parameters())
    for name, delta in run.pool.experts[RUN_NAME].tensors.items():
        weights = run.pool.base_tensors[name].cpu() + delta.cpu()
        torch.testing.assert_close(weights, trained[name].detach().cpu())
