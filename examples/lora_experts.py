"""PEFT LoRA adapters as experts: each joins the pool as base + its densified update.

python examples/lora_experts.py
"""

import torch
from tiny_pool import ensure_tiny_pool
from transformers import AutoTokenizer

from hf_mergelaw import ExpertPool, MethodSpec, build_eval_set
from hf_mergelaw.cross_entropy import cross_entropy

paths = ensure_tiny_pool()
pool = ExpertPool(
    paths["base"],
    {"lora": paths["lora"], "expert0": paths["experts"]["expert0"]},
    dtype=torch.float32,
)
adapted = [n for n in pool.parameters if n not in pool.experts["lora"].same_as_base]
print(f"the adapter changes {len(adapted)} tensors, e.g. {adapted[0]}")

tokenizer = AutoTokenizer.from_pretrained(paths["base"])
eval_set = build_eval_set(tokenizer, texts=["the cat sat on the mat"], max_length=32)
for subset in (["lora"], ["expert0"], ["lora", "expert0"]):
    pool.merge(MethodSpec.from_config({"name": "ties", "density": 0.5}), subset)
    print(subset, "cross-entropy:", round(cross_entropy(pool.model, eval_set).cross_entropy, 4))
