"""The ``merge_scaling`` metric: held-out cross-entropy of a causal LM, as the merging scaling
laws paper measures it (loss on response tokens only for prompt/response data).

    import evaluate
    metric = evaluate.load("merge_scaling")           # after `hf-mergelaw register-metric`
    metric = evaluate.load(hf_mergelaw.metric_path())  # or straight from the package
    metric.compute(model=model, tokenizer=tokenizer, texts=texts)
    metric.compute(model="path/to/model", prompts=prompts, responses=responses, domains=domains)

This file is loaded by ``evaluate`` as a standalone script (copied into its modules cache), so it
imports the package by absolute name, and ``import evaluate`` stays a plain import:
``from evaluate import Metric`` would put the base class first in the namespace, and evaluate
takes the first metric class it finds.
"""

import os

import datasets
import evaluate

from hf_mergelaw.cross_entropy import (
    build_eval_set,
    check_inputs,
    cross_entropy,
    fit_max_length,
    load_model,
)
from hf_mergelaw.errors import UserError

_DESCRIPTION = """\
Next-token cross-entropy (nats per scored token, token-weighted mean over the whole set) of a
causal language model on held-out data, with perplexity and the number of scored tokens. Given
prompts and responses, only response tokens are scored. Given domains, also per-domain values and
their unweighted (macro) mean. Equals transformers' own loss (`model(input_ids, labels=...).loss`)
on the same tokens. Batches are sorted by length, no gradients are kept, bf16 autocast on CUDA.
"""

_CITATION = """\
@article{wang2025mergingscalinglaws,
  title   = {Model Merging Scaling Laws in Large Language Models},
  author  = {Wang and others},
  journal = {arXiv preprint arXiv:2509.24244},
  year    = {2025}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    texts (`list[str]`): documents; every token is scored. Or:
    prompts (`list[str]`) and responses (`list[str]`): only response tokens are scored. The pair is
        tokenized as the text `prompt + response`; the loss starts at the first token reaching
        into the response.
    domains (`list[str]`, optional): one domain label per example.
    model (`PreTrainedModel` or `str`): a causal LM, or a path for AutoModelForCausalLM.
    tokenizer (`PreTrainedTokenizerBase` or `str`, optional): defaults to the model path.
    batch_size (`int`, default 8), max_length (`int`, default 2048: longer sequences are
        truncated), device (`str`, optional: default the model's device, or CUDA when available
        for a path).
Returns:
    cross_entropy (`float`), perplexity (`float`), num_tokens (`int`); with domains also
    macro_cross_entropy and, per domain, flat keys `cross_entropy/<domain>`,
    `perplexity/<domain>`, `num_tokens/<domain>` (flat so that trackers and `trainer.log` take
    them as they are).
Examples:
    >>> metric = evaluate.load("merge_scaling")
    >>> metric.compute(model=model, tokenizer=tokenizer, texts=["a held-out document"])
    {'cross_entropy': 2.31, 'perplexity': 10.07, 'num_tokens': 4}
    >>> metric.compute(model="out/merged", prompts=["Q: 2+2?"], responses=[" 4"], domains=["math"])
    {'cross_entropy': 1.2, 'perplexity': 3.3, 'num_tokens': 2, 'macro_cross_entropy': 1.2,
     'cross_entropy/math': 1.2, 'perplexity/math': 3.3, 'num_tokens/math': 2}
    >>> for batch in loader:  # incremental, as any evaluate metric
    ...     metric.add_batch(texts=batch["text"])
    >>> metric.compute(model=model, tokenizer=tokenizer, batch_size=16)
"""

# evaluate needs one fixed set of feature names, so texts and prompt/response pairs share one
# schema: a call's missing columns are stored as empty strings (its string check refuses nulls),
# and an all-empty column reads as absent in _compute. No real input is lost: an all-empty
# column has nothing to score either way.
_COLUMNS = ("texts", "prompts", "responses", "domains")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MergeScaling(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({name: datasets.Value("string") for name in _COLUMNS}),
            reference_urls=["https://arxiv.org/abs/2509.24244"],
        )

    # evaluate appends the inputs description to these two docstrings, so they must exist.
    def add_batch(self, **columns) -> None:
        """Add a batch: ``texts=[...]`` or ``prompts=[...], responses=[...]``; ``domains=[...]``."""
        given = {name: value for name, value in columns.items() if value is not None}
        # Unknown names go on to evaluate, which reports them.
        rows = check_inputs(**{name: given[name] for name in _COLUMNS if name in given})
        super().add_batch(**{name: [""] * rows for name in _COLUMNS} | given)

    def add(self, **example) -> None:
        """Add one example: ``texts="..."`` or ``prompts="...", responses="..."``; ``domains``."""
        given = {name: value for name, value in example.items() if value is not None}
        check_inputs(**{name: [given[name]] for name in _COLUMNS if name in given})
        super().add(**dict.fromkeys(_COLUMNS, "") | given)

    def _compute(
        self,
        texts,
        prompts,
        responses,
        domains,
        model=None,
        tokenizer=None,
        batch_size=8,
        max_length=2048,
        device=None,
    ):
        if model is None:
            raise UserError("merge_scaling needs model=... (a causal LM or a path to one).")
        if tokenizer is None:
            if not isinstance(model, (str, os.PathLike)):
                raise UserError(
                    "Pass tokenizer=... with a loaded model (optional only for a path)."
                )
            tokenizer = model
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        max_length = fit_max_length(max_length, model.config)
        columns = {"texts": texts, "prompts": prompts, "responses": responses, "domains": domains}
        eval_set = build_eval_set(tokenizer, **_stored_inputs(columns), max_length=max_length)
        return cross_entropy(model, eval_set, batch_size=batch_size, device=device).to_dict()


def _stored_inputs(columns: dict[str, list[str]]) -> dict[str, list[str]]:
    """The columns holding data; the all-empty ones were filled in by add/add_batch."""
    given = {name: column for name, column in columns.items() if any(column)}
    if given.keys() & {"prompts", "responses"}:
        # An all-empty prompt column is real data (unconditional responses): keep the pair.
        given["prompts"], given["responses"] = columns["prompts"], columns["responses"]
    elif "texts" not in given:
        # Nothing to score at all: build_eval_set reports it.
        given["texts"] = columns["texts"]
    return given
