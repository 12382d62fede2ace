"""A small Llama and a plain training loop on random windows of token streams (CPU-sized).

    model = new_model(settings, tokenizer)
    log = train_causal_lm(model, streams, steps=500, lr=3e-3, batch_size=16, seq_len=128,
                          seed=0, desc="base")

A plain loop rather than `Trainer`: no dataset objects, no checkpoints, and nothing to configure
for a few hundred steps on one CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_mergelaw.errors import DemoError

from .settings import PoolSettings

_WARMUP_FRACTION = 0.1
_FINAL_LR_FRACTION = 0.1
_MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TrainLog:
    """How one training run went: mean loss over its first and last tenth of steps."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def new_model(settings: PoolSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama of the settings' shape (seeded)."""
    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.seq_len,
        # Untied: every tensor is its own task vector, as in the paper's models.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """All ``texts`` as one stream of token ids, files separated by the end-of-text token."""
    ids: list[int] = []
    for encoded in tokenizer(list(texts))["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(
    streams: Sequence[torch.Tensor], batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens; each row picks a stream uniformly, so a
    mixture of domains is weighted equally whatever each domain's size."""
    which = torch.randint(len(streams), (batch_size,), generator=generator)
    rows = []
    for index in which.tolist():
        stream = streams[index]
        if stream.numel() <= seq_len:
            raise DemoError(
                f"a token stream of {stream.numel()} tokens is too short for windows of "
                f"{seq_len}; raise max_train_chars or lower seq_len."
            )
        start = int(torch.randint(stream.numel() - seq_len, (1,), generator=generator))
        rows.append(stream[start : start + seq_len])
    return torch.stack(rows)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first tenth, then cosine decay to a tenth of the peak."""
    warmup = max(1, int(_WARMUP_FRACTION * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = _FINAL_LR_FRACTION * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_causal_lm(
    model: LlamaForCausalLM,
    streams: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    seed: int,
    desc: str,
    progress: bool = True,
) -> TrainLog:
    """Next-token training with AdamW (no weight decay: it would pull every weight towards zero
    and blur which directions a domain's fine-tuning moved)."""
    generator = torch.Generator().manual_seed(seed)
    # fused: one kernel per step instead of a dozen per tensor (~10% of a step on a tiny model).
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        batch = sample_windows(streams, batch_size, seq_len, generator)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tenth = max(1, steps // 10)
    return TrainLog(
        steps=steps,
        seconds=time.perf_counter() - start,
        first_loss=sum(losses[:tenth]) / tenth,
        last_loss=sum(losses[-tenth:]) / tenth,
    )
