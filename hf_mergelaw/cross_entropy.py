"""Held-out cross-entropy of a causal LM: the ``merge_scaling`` metric's code path.

Tokenise once, evaluate many models (the sweep engine merges hundreds of models and scores each on
the same data)::

    from hf_mergelaw.cross_entropy import build_eval_set, cross_entropy

    eval_set = build_eval_set(tokenizer, prompts=prompts, responses=responses, domains=domains)
    result = cross_entropy(model, eval_set, batch_size=8)
    result.cross_entropy, result.per_domain["math"].perplexity, result.to_dict()

The value equals transformers' own loss on the same tokens: ``model(input_ids, labels=labels).loss``
for one sequence, and the token-weighted mean of those losses over several sequences.

Prompt/response pairs are tokenised as the concatenated text ``prompt + response`` (so the token
ids and special tokens are exactly those of ``texts=[prompt + response]``), and the loss covers the
tokens from the first one that reaches into the response onwards, found with the fast tokenizer's
offset mapping. A token straddling the boundary therefore counts as a response token; the paper
measures the loss on responses only.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import UserError

IGNORE_INDEX = -100  # transformers' label value for "not scored"

# Upper bound on the fp32 logits upcast at once (elements): the model already holds the logits of a
# whole batch, and a [tokens, vocab] fp32 copy of them all could double that.
_LOGITS_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Tokenised evaluation data, sorted by length (longest first) for padding-efficient batches.

    ``labels[i]`` is ``input_ids[i]`` with ``-100`` on tokens that are not scored (the prompt).
    ``num_skipped`` sequences had no token to score and are not included.
    """

    input_ids: tuple[torch.Tensor, ...]
    labels: tuple[torch.Tensor, ...]
    domains: tuple[str, ...] | None
    num_skipped: int = 0
    # Scored tokens per sequence: labels after the first position (the first token is never
    # predicted), as transformers' shifted loss counts them.
    token_counts: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        counts = tuple(int((labels[1:] != IGNORE_INDEX).sum()) for labels in self.labels)
        object.__setattr__(self, "token_counts", counts)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class DomainCrossEntropy:
    cross_entropy: float
    perplexity: float
    num_tokens: int


@dataclass(frozen=True)
class CrossEntropy:
    """Token-weighted mean cross-entropy (nats) and, with domains, per-domain values.

    ``macro_cross_entropy`` is the unweighted mean over domains (None without domains).
    """

    cross_entropy: float
    perplexity: float
    num_tokens: int
    per_domain: dict[str, DomainCrossEntropy]
    macro_cross_entropy: float | None

    def to_dict(self) -> dict[str, float | int]:
        """The metric's output: flat keys, so loggers and ``evaluate.combine`` take it as is.

        >>> result.to_dict()  # doctest: +SKIP
        {'cross_entropy': 2.1, 'perplexity': 8.2, 'num_tokens': 900,
         'macro_cross_entropy': 2.2, 'cross_entropy/math': 1.9, 'perplexity/math': 6.7,
         'num_tokens/math': 400, 'cross_entropy/code': 2.5, ...}
        """
        out: dict[str, float | int] = {
            "cross_entropy": self.cross_entropy,
            "perplexity": self.perplexity,
            "num_tokens": self.num_tokens,
        }
        if self.macro_cross_entropy is not None:
            out["macro_cross_entropy"] = self.macro_cross_entropy
        for domain, value in self.per_domain.items():
            out[f"cross_entropy/{domain}"] = value.cross_entropy
            out[f"perplexity/{domain}"] = value.perplexity
            out[f"num_tokens/{domain}"] = value.num_tokens
        return out


def build_eval_set(
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
    *,
    texts: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    responses: Sequence[str] | None = None,
    domains: Sequence[str] | None = None,
    max_length: int = 2048,
) -> EvalSet:
    """Tokenise ``texts`` (every token scored) or ``prompts`` + ``responses`` (responses scored).

    ``tokenizer`` is a tokenizer or a path for ``AutoTokenizer.from_pretrained``; it needs no pad
    token (batches are padded here).
    Sequences are truncated to ``max_length`` tokens (from the right, special tokens kept as the
    tokenizer's truncation does). Sequences left with no token to score (an empty response, or a
    prompt that fills ``max_length``) are skipped with a warning; if nothing is left to score, or a
    domain has nothing left, a ``UserError`` says so.

    >>> eval_set = build_eval_set(tokenizer, texts=["a held-out document", "another one"])
    >>> eval_set = build_eval_set(tokenizer, prompts=["Q: 2+2?"], responses=[" A: 4"],
    ...                           domains=["math"], max_length=1024)
    """
    if max_length < 2:
        raise UserError(
            f"max_length must be at least 2 (a context and a scored token), got {max_length}"
        )
    size = check_inputs(texts, prompts, responses, domains)
    if size == 0:
        raise UserError("The evaluation set has no tokens to score; it holds no sequence.")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if texts is not None:
        input_ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        labels = [list(ids) for ids in input_ids]
    else:
        input_ids, labels = _tokenize_pairs(tokenizer, prompts, responses, max_length)
    has_score = [any(label != IGNORE_INDEX for label in seq[1:]) for seq in labels]
    kept = [i for i in range(size) if has_score[i]]
    skipped = [i for i in range(size) if not has_score[i]]
    _check_scorable(size, skipped, domains, kept, max_length)
    kept.sort(key=lambda i: -len(input_ids[i]))  # stable: equal lengths keep input order
    return EvalSet(
        input_ids=tuple(torch.tensor(input_ids[i], dtype=torch.long) for i in kept),
        labels=tuple(torch.tensor(labels[i], dtype=torch.long) for i in kept),
        domains=None if domains is None else tuple(domains[i] for i in kept),
        num_skipped=len(skipped),
    )


def cross_entropy(
    model: PreTrainedModel | str | os.PathLike,
    eval_set: EvalSet,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> CrossEntropy:
    """Cross-entropy of ``model`` on ``eval_set`` (nats per scored token, token-weighted mean).

    ``model`` is a loaded causal LM (evaluated where it is, or moved to ``device``) or a path for
    ``AutoModelForCausalLM.from_pretrained`` (loaded on ``device``, default CUDA when available).
    No gradients; bf16 autocast on CUDA; fp32 log-softmax, fp64 sums. The model's train/eval mode
    is restored afterwards.

    >>> result = cross_entropy(model, eval_set, batch_size=16)
    >>> result.cross_entropy, result.perplexity, result.num_tokens
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if len(eval_set) == 0:
        raise UserError("The evaluation set has no tokens to score; it holds no sequence.")
    model, device = _resolve_model(model, device)
    was_training = model.training
    model.eval()
    try:
        sequence_losses = _sequence_losses(model, eval_set, batch_size, device)
    finally:
        model.train(was_training)
    return _aggregate(sequence_losses.tolist(), eval_set)


def check_inputs(texts=None, prompts=None, responses=None, domains=None) -> int:
    """Check that exactly one input mode is used and the columns align; return the row count.

    >>> check_inputs(prompts=["Q: 2+2?"], responses=[" 4"], domains=["math"])
    1
    """
    if texts is not None and (prompts is not None or responses is not None):
        raise UserError("Pass either texts or prompts with responses, not both.")
    if texts is None and (prompts is None) != (responses is None):
        given, missing = ("prompts", "responses") if responses is None else ("responses", "prompts")
        raise UserError(f"{given} were given without {missing}; pass both (one per example).")
    if texts is None and prompts is None:
        raise UserError(
            "Nothing to evaluate: pass texts=[...] or prompts=[...] with responses=[...]."
        )
    columns = (
        {"texts": texts} if texts is not None else {"prompts": prompts, "responses": responses}
    )
    if domains is not None:
        columns["domains"] = domains
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"Inputs must have one entry per example; got lengths {lengths}.")
    for name, column in columns.items():
        bad = next((i for i, value in enumerate(column) if not isinstance(value, str)), None)
        if bad is not None:
            raise UserError(f"{name}[{bad}] must be a string, got {type(column[bad]).__name__}.")
    empty = next((i for i, value in enumerate(domains or ()) if not value.strip()), None)
    if empty is not None:
        raise UserError(
            f"domains[{empty}] is empty: give every example a domain name (in every add or "
            "add_batch call), or give no domains at all."
        )
    return next(iter(lengths.values()))


def context_length(config: Any) -> int | None:
    """Positions the model can attend to (``max_position_embeddings``), if its config says."""
    value = getattr(config, "max_position_embeddings", None)
    if value is None and isinstance(config, dict):
        value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_max_length(max_length: int, config: Any) -> int:
    """``max_length``, lowered (with a warning) to the model's context if it is longer."""
    limit = context_length(config)
    if limit is not None and max_length > limit:
        warnings.warn(
            f"max_length={max_length} is longer than the model's {limit} positions; sequences are "
            f"truncated to {limit} tokens.",
            stacklevel=2,
        )
        return limit
    return max_length


def _tokenize_pairs(
    tokenizer, prompts, responses, max_length
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of ``prompt + response`` and labels masked up to the first response token."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "prompts/responses need a fast tokenizer (its offset mapping locates the response); "
            f"{type(tokenizer).__name__} is not one. Load it with AutoTokenizer.from_pretrained."
        )
    encoded = tokenizer(
        [p + r for p, r in zip(prompts, responses, strict=True)],
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
    )
    labels = []
    for ids, offsets, prompt in zip(
        encoded["input_ids"], encoded["offset_mapping"], prompts, strict=True
    ):
        # Special tokens have empty spans, so a BOS stays on the prompt side and an EOS after
        # the response is scored, as it would be for texts=[prompt + response].
        start = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
        labels.append([IGNORE_INDEX] * start + list(ids[start:]))
    return [list(ids) for ids in encoded["input_ids"]], labels


def _check_scorable(size, skipped, domains, kept, max_length) -> None:
    """Raise when nothing (or a whole domain) is left to score; warn about skipped sequences."""
    reason = (
        "(an empty response or text, a single token, "
        f"or a prompt that fills max_length={max_length})"
    )
    if not kept:
        raise UserError(
            f"The evaluation set has no tokens to score; {size} sequence(s) given, "
            f"{len(skipped)} without a token to score {reason}."
        )
    if domains is not None:
        empty = sorted(set(domains) - {domains[i] for i in kept})
        if empty:
            raise UserError(
                f"Domain(s) {empty} have no tokens to score; every one of their sequences is "
                f"without a token to score {reason}."
            )
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(
            f"{len(skipped)} of {size} sequences have no token to score {reason} and are "
            f"skipped: indices {shown}.",
            UserWarning,
            stacklevel=3,
        )


def load_model(model: str | os.PathLike) -> PreTrainedModel:
    """A causal LM from a folder (or a name in the local Hugging Face cache)."""
    text = os.fspath(model)
    looks_like_a_path = (
        os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
    )
    if looks_like_a_path and not os.path.isdir(os.path.expanduser(text)):
        raise UserError(f"model={text!r}: no such folder. Point it at a save_pretrained folder.")
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(text))
    except (OSError, ValueError) as error:
        raise UserError(f"model={text!r} could not be loaded: {error}") from None


def _resolve_model(model, device) -> tuple[PreTrainedModel, torch.device]:
    if isinstance(model, (str, os.PathLike)):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return load_model(model).to(device), device
    if device is None:
        return model, next(model.parameters()).device
    device = torch.device(device)
    return model.to(device), device


@torch.inference_mode()
def _sequence_losses(
    model, eval_set: EvalSet, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Summed next-token CE per sequence (fp64, on ``device``: one host sync at the end)."""
    losses = torch.zeros(len(eval_set), dtype=torch.float64, device=device)
    for start in range(0, len(eval_set), batch_size):
        stop = min(start + batch_size, len(eval_set))
        input_ids, labels, attention_mask = _pad_batch(eval_set, start, stop, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
        losses[start:stop] = _summed_token_losses(logits, labels)
    return losses


def _pad_batch(eval_set: EvalSet, start: int, stop: int, device: torch.device):
    """Right-pad to the longest sequence; the pad id is arbitrary since it is masked out."""
    ids = torch.nn.utils.rnn.pad_sequence(eval_set.input_ids[start:stop], batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence(
        eval_set.labels[start:stop], batch_first=True, padding_value=IGNORE_INDEX
    )
    lengths = torch.tensor([len(s) for s in eval_set.input_ids[start:stop]])
    attention_mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    return ids.to(device), labels.to(device), attention_mask.to(device)


def _summed_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of CE(logits[t], labels[t + 1]) over scored positions, as transformers shifts."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows = scored.nonzero(as_tuple=True)[0]
    picked_logits, picked_targets = logits[:, :-1][scored], targets[scored]
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    chunk = max(1, _LOGITS_CHUNK_ELEMENTS // logits.shape[-1])
    for i in range(0, picked_targets.numel(), chunk):
        token_losses = F.cross_entropy(
            picked_logits[i : i + chunk].float(), picked_targets[i : i + chunk], reduction="none"
        )
        sums.index_add_(0, rows[i : i + chunk], token_losses.double())
    return sums


def _aggregate(sequence_losses: list[float], eval_set: EvalSet) -> CrossEntropy:
    total = _domain_value(sum(sequence_losses), eval_set.num_tokens)
    per_domain: dict[str, DomainCrossEntropy] = {}
    if eval_set.domains is not None:
        loss_sums: dict[str, float] = defaultdict(float)
        token_sums: dict[str, int] = defaultdict(int)
        for loss, tokens, domain in zip(
            sequence_losses, eval_set.token_counts, eval_set.domains, strict=True
        ):
            loss_sums[domain] += loss
            token_sums[domain] += tokens
        per_domain = {d: _domain_value(loss_sums[d], token_sums[d]) for d in sorted(loss_sums)}
    macro = (
        sum(v.cross_entropy for v in per_domain.values()) / len(per_domain) if per_domain else None
    )
    return CrossEntropy(
        cross_entropy=total.cross_entropy,
        perplexity=total.perplexity,
        num_tokens=total.num_tokens,
        per_domain=per_domain,
        macro_cross_entropy=macro,
    )


def _domain_value(loss_sum: float, num_tokens: int) -> DomainCrossEntropy:
    mean = loss_sum / num_tokens
    # exp overflows a float beyond ~709 nats (a diverged model); report inf rather than raise.
    perplexity = math.exp(mean) if mean < 709 else math.inf
    return DomainCrossEntropy(cross_entropy=mean, perplexity=perplexity, num_tokens=num_tokens)
