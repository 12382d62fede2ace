"""Tiny Llama checkpoints and a word-level tokenizer built locally (tests never reach the Hub)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SENTENCES = (
    "the cat sat on the mat and looked at the door",
    "a dog ran across the park after the red ball",
    "prime numbers have exactly two divisors one and themselves",
    "def add ( a , b ) : return a + b",
    "water boils at one hundred degrees at sea level",
    "the triangle has three sides and three angles",
)


def build_tokenizer(texts: Iterable[str] = SENTENCES) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "[PAD]", "<s>"]
    tokenizer.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>"
    )


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


def save_model(model: LlamaForCausalLM, path: Path, tokenizer=None) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_family(
    root: Path, num_experts: int, *, seed: int = 0, noise: float = 0.05
) -> tuple[Path, dict[str, Path]]:
    """A base (with tokenizer) and experts = base + independent Gaussian deltas."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config())
    base_dir = save_model(base, root / "base", build_tokenizer())
    experts = {}
    for index in range(num_experts):
        expert = LlamaForCausalLM(tiny_llama_config())
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(noise * torch.randn_like(parameter))
        experts[f"expert{index}"] = save_model(expert, root / f"expert{index}")
    return base_dir, experts


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
