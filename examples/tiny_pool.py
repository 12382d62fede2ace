"""A tiny offline pool for the examples: a Llama base, four full fine-tune experts, one LoRA
adapter expert, and held-out texts in two domains. Built in seconds, once, into `./tiny_pool`.

Replace these paths with your own checkpoints; nothing here is needed with real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(paths["base"])
    fast.save_pretrained(paths["base"])
    state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    for path in paths["experts"].values():
        base.load_state_dict({n: t + 0.02 * torch.randn_like(t) for n, t in state.items()})
        base.save_pretrained(path)
        fast.save_pretrained(path)
    base.load_state_dict(state)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(paths["lora"])
    rows = [{"text": t, "domain": d} for d, domain_texts in TEXTS.items() for t in domain_texts]
    paths["eval"].write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    print(json.dumps(ensure_tiny_pool(), default=str, indent=2))
