"""The tests' tiny pool: a word-level tokenizer over a few sentences, a tiny Llama and noisy
experts of it (built with :mod:`hf_mergelaw.testing`; tests never reach the Hub)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from hf_mergelaw.testing import (
    gaussian_noise,
    save_noisy_experts,
    tiny_llama_config,
    word_tokenizer,
)

SENTENCES = (
    "the cat sat on the mat and looked at the door",
    "a dog ran across the park after the red ball",
    "prime numbers have exactly two divisors one and themselves",
    "def add ( a , b ) : return a + b",
    "water boils at one hundred degrees at sea level",
    "the triangle has three sides and three angles",
)


def save_family(
    root: Path, num_experts: int, *, seed: int = 0, noise: float = 0.05
) -> tuple[Path, dict[str, Path]]:
    """A base (with tokenizer) and experts = base + independent Gaussian deltas."""
    return save_noisy_experts(
        root,
        tiny_llama_config(),
        num_experts,
        perturb=gaussian_noise(noise),
        seed=seed,
        tokenizer=word_tokenizer(SENTENCES),
    )


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sweep_yaml(tmp_path: Path, family, **overrides: object) -> Path:
    """A sweep YAML over ``family`` (base, experts) in ``tmp_path``: texts of two domains, average
    and TIES, k = 1-3, every subset, float32; ``overrides`` replace top-level keys."""
    base, experts = family
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"text": text, "domain": "ab"[i % 2]} for i, text in enumerate(SENTENCES)],
    )
    config = {
        "base_model": str(base),
        "experts": {name: str(path) for name, path in experts.items()},
        "eval": {"data": str(data), "text_field": "text", "domain_field": "domain",
                 "max_length": 32, "batch_size": 4},
        "methods": [{"name": "average"}, {"name": "ties", "density": 0.5}],
        "k": "1-3",
        "sampling": {"strategy": "all"},
        "output": str(tmp_path / "out" / "results.jsonl"),
        "dtype": "float32",
        **overrides,
    }  # fmt: skip
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump(config))
    return path
