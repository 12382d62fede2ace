"""A training run that produces an expert keeps the merging law up to date.

When `trainer.train()` ends, MergeScalingCallback adds the trained model to the pool, merges and
evaluates subsets of the pool, fits L_inf + A/(k+b), and logs `eval_merge_*` values through
`trainer.log` (so they reach `log_history` and your trackers).

    python examples/trainer_callback.py
"""

import torch
from datasets import Dataset
from tiny_pool import TEXTS, ensure_tiny_pool
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from hf_mergelaw import ExpertPool, MergeScalingCallback, build_eval_set

pool_paths = ensure_tiny_pool()
tokenizer = AutoTokenizer.from_pretrained(pool_paths["base"])
pool = ExpertPool(pool_paths["base"], pool_paths["experts"], dtype=torch.float32)
held_out = build_eval_set(tokenizer, texts=TEXTS["math"], max_length=64)

train = Dataset.from_dict({"text": TEXTS["math"] * 8}).map(
    lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
)
trainer = Trainer(
    model=AutoModelForCausalLM.from_pretrained(pool_paths["base"]),
    args=TrainingArguments(
        "tiny_pool/run",
        max_steps=5,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        run_name="math-expert",
    ),
    train_dataset=train,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
)
trainer.add_callback(MergeScalingCallback(trainer, pool, held_out, target_loss=4.0, per_k=4))
trainer.train()

merge_logs = [row for row in trainer.state.log_history if "eval_merge_pool_size" in row]
print({key: round(value, 4) for key, value in merge_logs[-1].items()})
