"""Tiny pools built offline in seconds, for tests, benchmarks and examples (nothing downloaded).

    >>> from hf_mergelaw.testing import save_noisy_experts, tiny_llama_config, word_tokenizer
    >>> tokenizer = word_tokenizer(["the cat sat on the mat", "def add ( a , b ) :"])
    >>> base, experts = save_noisy_experts(root, tiny_llama_config(), 3, tokenizer=tokenizer)

An expert here is the base plus independent noise: enough to exercise merging, sweeps and fits,
never a trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

Perturb = Callable[[torch.Tensor], torch.Tensor]


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A two-layer Llama of a few thousand parameters (the shape mergekit's own tests use)."""
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer trained on ``texts``, with unk, pad and bos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "[PAD]", "<s>"]
    tokenizer.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>"
    )


def gaussian_noise(scale: float) -> Perturb:
    """Add N(0, scale^2) to every entry."""
    return lambda tensor: tensor + scale * torch.randn_like(tensor)


def save_noisy_experts(
    root: str | Path,
    config: LlamaConfig,
    num_experts: int,
    *,
    perturb: Perturb | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> tuple[Path, dict[str, Path]]:
    """Save a random base (with ``tokenizer``, if given) to ``root/base``, and ``expert{i}`` =
    the base with every tensor perturbed (default: ``gaussian_noise(0.05)``) to
    ``root/expert{i}``."""
    root = Path(root)
    perturb = gaussian_noise(0.05) if perturb is None else perturb
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    save_model(model, root / "base", tokenizer)
    experts = {}
    for index in range(num_experts):
        model.load_state_dict({name: perturb(tensor) for name, tensor in base.items()})
        experts[f"expert{index}"] = save_model(model, root / f"expert{index}")
    model.load_state_dict(base)
    return root / "base", experts


def save_model(
    model: LlamaForCausalLM, path: str | Path, tokenizer: PreTrainedTokenizerFast | None = None
) -> Path:
    """``save_pretrained`` the model (and the tokenizer, if given) to ``path``."""
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return Path(path)
