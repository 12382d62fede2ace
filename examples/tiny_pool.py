"""A tiny offline pool for the examples: a Llama base, four full fine-tune experts, one LoRA
adapter expert, and held-out texts in two domains. Built in seconds, once, into `./tiny_pool`.

Replace these paths with your own checkpoints; nothing here is needed with real models.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hf_mergelaw.testing import (
    gaussian_noise,
    save_noisy_experts,
    tiny_llama_config,
    word_tokenizer,
)

TEXTS = {
    "animals": [
        "the cat sat on the mat and looked at the door",
        "a dog ran across the park after the red ball",
        "the bird sang in the tree while the cat slept",
    ],
    "math": [
        "prime numbers have exactly two divisors one and themselves",
        "the triangle has three sides and three angles",
        "two plus two is four and four times two is eight",
    ],
}


def ensure_tiny_pool(root: str | Path = "tiny_pool") -> dict:
    """Paths of the pool's parts (built on first use)."""
    root = Path(root)
    paths = {
        "base": root / "base",
        "experts": {f"expert{i}": root / f"expert{i}" for i in range(4)},
        "lora": root / "lora",
        "eval": root / "eval.jsonl",
    }
    if not (root / "done").exists():
        _build(paths)
        (root / "done").touch()
    return paths


def _build(paths: dict) -> None:
    texts = [text for domain in TEXTS.values() for text in domain]
    config = tiny_llama_config(intermediate_size=64)
    save_noisy_experts(
        paths["base"].parent,
        config,
        len(paths["experts"]),
        perturb=gaussian_noise(0.02),
        tokenizer=word_tokenizer(texts),
    )
    base = AutoModelForCausalLM.from_pretrained(paths["base"])
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(paths["lora"])
    rows = [{"text": t, "domain": d} for d, domain_texts in TEXTS.items() for t in domain_texts]
    paths["eval"].write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    print(json.dumps(ensure_tiny_pool(), default=str, indent=2))
