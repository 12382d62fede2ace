"""Cross-entropy of a model with `evaluate.load("merge_scaling")`: texts, or prompt/response pairs
scored on the response tokens only (as the scaling-law paper measures), per domain.

    python examples/evaluate_metric.py
"""

import evaluate
from tiny_pool import TEXTS, ensure_tiny_pool

pool = ensure_tiny_pool()
metric = evaluate.load("merge_scaling")  # registered offline by `pip install hf-mergelaw`

texts = [text for domain in TEXTS.values() for text in domain]
domains = [domain for domain, domain_texts in TEXTS.items() for _ in domain_texts]
result = metric.compute(model=str(pool["base"]), texts=texts, domains=domains, batch_size=4)
print({key: round(value, 4) for key, value in result.items()})

pairs = metric.compute(
    model=str(pool["base"]),
    prompts=["the cat sat on", "two plus two is"],
    responses=["the mat", "four"],
)
print("response-only cross-entropy:", round(pairs["cross_entropy"], 4))
