"""MergeScalingCallback inside a real `Trainer.train()`: the trained model joins the pool."""

from __future__ import annotations

import math

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


def test_finished_run_joins_the_pool_and_logs_the_fitted_law(tmp_path) -> None:
    base, experts = save_family(tmp_path / "family", num_experts=3)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pool = ExpertPool(base, experts, dtype=torch.float32)
    eval_set = build_eval_set(tokenizer, texts=list(SENTENCES), max_length=32)
    train = Dataset.from_dict({"text": list(SENTENCES) * 4}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        tmp_path / "run", max_steps=3, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", use_cpu=True, run_name="math-sft",
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

    assert pool.names == ["expert0", "expert1", "expert2", "math-sft"]
    logged = [row for row in trainer.state.log_history if "eval_merge_pool_size" in row]
    assert len(logged) == 1
    metrics = logged[0]
    assert metrics["eval_merge_pool_size"] == 4
    for key in ("eval_merge_floor", "eval_merge_tail", "eval_merge_b", "eval_merge_r2",
                "eval_merge_next_expert_gain", "eval_merge_k_for_target"):  # fmt: skip
        assert key in metrics and math.isfinite(metrics[key])
    records = list(RecordStore(tmp_path / "run" / "merge_scaling" / "results.jsonl"))
    assert len(records) == 15  # every subset of 4 experts
    mean_k4 = [r["ce"] for r in records if r["k"] == 4]
    assert metrics["eval_merge_ce_k4"] == mean_k4[0]
    # The trained expert is a snapshot: the pool's copy is not the live training tensor.
    trained = dict(trainer.model.named_parameters())
    for name, tensor in pool.experts["math-sft"].tensors.items():
        assert tensor.data_ptr() != trained[name].data_ptr()
