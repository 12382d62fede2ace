"""The merge_scaling metric and its cross-entropy code path, on a tiny random Llama (offline)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import hf_mergelaw
from hf_mergelaw.cross_entropy import build_eval_set, cross_entropy
from hf_mergelaw.metric_registration import register_metric
from hf_mergelaw.testing import tiny_llama_config

REPO_ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat sat",
    "question: what is two plus two? answer: four",
    "merging experts lowers the loss",
    "the law has a floor and a tail, and the tail shrinks as one over k",
    "hi",
    "experts",
]
PROMPTS = ["question: what is two plus two?", "the cat", "merging", "a dog ran in"]
RESPONSES = [" answer: four", " sat on the mat", " experts lowers the loss", " the park"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with a BOS post-processor and no pad token, as many causal LMs have."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).eval()


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def metric() -> evaluate.EvaluationModule:
    return evaluate.load(hf_mergelaw.metric_path())


def reference_loss(model, sequences: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Token-weighted mean of transformers' own loss on each (input_ids, labels) pair alone."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in sequences:
            n = sum(label != -100 for label in labels[1:])
            loss = model(torch.tensor([ids]), labels=torch.tensor([labels])).loss
            total += loss.item() * n
            tokens += n
    return total / tokens, tokens


def pair_reference(tokenizer, prompts, responses) -> list[tuple[list[int], list[int]]]:
    """prompt + response ids with the prompt's own tokens (BOS included) masked."""
    sequences = []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + response)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # these prompts end on a token boundary
        sequences.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]))
    return sequences


def test_texts_match_transformers_loss_for_any_batch_size(model, tokenizer):
    eval_set = build_eval_set(tokenizer, texts=CORPUS)
    expected, tokens = reference_loss(model, [(ids, ids) for ids in tokenizer(CORPUS)["input_ids"]])
    lengths = [len(ids) for ids in eval_set.input_ids]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 3

    model.train()
    results = [cross_entropy(model, eval_set, batch_size=b) for b in (1, 3, 8)]
    assert model.training  # mode restored

    for result in results:
        assert result.num_tokens == tokens == eval_set.num_tokens
        assert result.cross_entropy == pytest.approx(expected, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
        assert result.per_domain == {} and result.macro_cross_entropy is None
    assert results[0].cross_entropy == pytest.approx(results[1].cross_entropy, rel=1e-6)


def test_single_sequence_equals_model_loss(model, tokenizer):
    ids = tokenizer(CORPUS[4], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids, labels=ids).loss.item()
    result = cross_entropy(model, build_eval_set(tokenizer, texts=[CORPUS[4]]))
    assert result.cross_entropy == pytest.approx(expected, rel=1e-6)
    assert result.num_tokens == ids.shape[1] - 1


def test_max_length_truncates(model, tokenizer):
    eval_set = build_eval_set(tokenizer, texts=CORPUS, max_length=5)
    assert max(len(ids) for ids in eval_set.input_ids) == 5
    truncated = [ids[:5] for ids in tokenizer(CORPUS)["input_ids"]]
    expected, _ = reference_loss(model, [(ids, ids) for ids in truncated])
    assert cross_entropy(model, eval_set, batch_size=3).cross_entropy == pytest.approx(expected)


def test_prompt_response_scores_only_responses(model, tokenizer):
    eval_set = build_eval_set(tokenizer, prompts=PROMPTS, responses=RESPONSES)
    expected, tokens = reference_loss(model, pair_reference(tokenizer, PROMPTS, RESPONSES))
    for batch_size in (1, 3):
        result = cross_entropy(model, eval_set, batch_size=batch_size)
        assert result.num_tokens == tokens
        assert result.cross_entropy == pytest.approx(expected, rel=1e-5)


def test_token_straddling_the_boundary_is_scored(tokenizer):
    # " cat" is one token: split inside it, it reaches into the response, so it is scored.
    eval_set = build_eval_set(tokenizer, prompts=["the ca"], responses=["t sat"])
    (ids,), (labels,) = eval_set.input_ids, eval_set.labels
    assert ids.tolist() == tokenizer("the cat sat")["input_ids"]
    scored = [token for token, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(scored) == " cat sat"


def test_per_domain_values_and_macro_mean(model, tokenizer, metric):
    domains = ["math", "prose", "prose", "math", "law", "prose", "law"]
    out = metric.compute(model=model, tokenizer=tokenizer, texts=CORPUS, domains=domains)
    for domain in ("math", "prose", "law"):
        texts = [t for t, d in zip(CORPUS, domains, strict=True) if d == domain]
        alone = cross_entropy(model, build_eval_set(tokenizer, texts=texts))
        assert out[f"cross_entropy/{domain}"] == pytest.approx(alone.cross_entropy, rel=1e-6)
        assert out[f"perplexity/{domain}"] == pytest.approx(alone.perplexity, rel=1e-6)
        assert out[f"num_tokens/{domain}"] == alone.num_tokens
    per_domain = [out[f"cross_entropy/{d}"] for d in ("math", "prose", "law")]
    assert out["macro_cross_entropy"] == pytest.approx(sum(per_domain) / 3)
    overall = cross_entropy(model, build_eval_set(tokenizer, texts=CORPUS))
    assert out["cross_entropy"] == pytest.approx(overall.cross_entropy, rel=1e-6)


def test_metric_equals_code_path_and_accepts_a_model_path(model, tokenizer, model_dir, metric):
    eval_set = build_eval_set(tokenizer, prompts=PROMPTS, responses=RESPONSES)
    direct = cross_entropy(model, eval_set, batch_size=3)
    by_object = metric.compute(
        model=model, tokenizer=tokenizer, prompts=PROMPTS, responses=RESPONSES, batch_size=3
    )
    by_path = metric.compute(model=str(model_dir), prompts=PROMPTS, responses=RESPONSES)
    assert by_object == direct.to_dict()
    assert set(by_path) == {"cross_entropy", "perplexity", "num_tokens"}
    assert by_path["num_tokens"] == direct.num_tokens
    assert by_path["cross_entropy"] == pytest.approx(direct.cross_entropy, rel=1e-6)

    metric.add_batch(texts=CORPUS[:3])
    metric.add(texts=CORPUS[3])
    incremental = metric.compute(model=model, tokenizer=tokenizer)
    expected = cross_entropy(model, build_eval_set(tokenizer, texts=CORPUS[:4]))
    assert incremental["cross_entropy"] == pytest.approx(expected.cross_entropy, rel=1e-6)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"texts": []}, "has no tokens to score"),
        ({"prompts": ["a"]}, "prompts were given without responses"),
        ({"texts": ["a b", "c"], "domains": ["x"]}, "one entry per example"),
        ({"prompts": ["a", "b"], "responses": ["", ""]}, "has no tokens to score"),
        ({"texts": ["a"], "prompts": ["b"], "responses": ["c"]}, "not both"),
        ({"texts": ["the cat", ""], "domains": ["x", "y"]}, r"Domain\(s\) \['y'\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, tokenizer, metric, inputs, message):
    # An empty text is only a BOS: nothing to score. A domain left with nothing is an error.
    with pytest.raises(ValueError, match=message):
        metric.compute(model=model, tokenizer=tokenizer, **inputs)


def test_bad_build_and_compute_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        build_eval_set(tokenizer)
    with pytest.raises(ValueError, match="lengths"):
        build_eval_set(tokenizer, prompts=["a", "b"], responses=["c"])
    with pytest.raises(ValueError, match=r"texts\[1\] must be a string"):
        build_eval_set(tokenizer, texts=["a", None])
    with pytest.raises(ValueError, match="batch_size"):
        cross_entropy(model, build_eval_set(tokenizer, texts=CORPUS[:1]), batch_size=0)


def test_sequences_without_response_tokens_are_skipped_with_a_warning(model, tokenizer):
    with pytest.warns(UserWarning, match=r"1 of 3 sequences have no token to score.*indices 1"):
        eval_set = build_eval_set(
            tokenizer, prompts=PROMPTS[:3], responses=[RESPONSES[0], "", RESPONSES[2]]
        )
    assert len(eval_set) == 2 and eval_set.num_skipped == 1
    expected, _ = reference_loss(model, pair_reference(tokenizer, PROMPTS[:3:2], RESPONSES[:3:2]))
    assert cross_entropy(model, eval_set).cross_entropy == pytest.approx(expected, rel=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_autocast_stays_close_to_fp32(model, tokenizer):
    eval_set = build_eval_set(tokenizer, prompts=PROMPTS, responses=RESPONSES)
    on_cpu = cross_entropy(model, eval_set)
    on_gpu = cross_entropy(copy.deepcopy(model), eval_set, device="cuda")
    assert on_gpu.num_tokens == on_cpu.num_tokens
    assert on_gpu.cross_entropy == pytest.approx(on_cpu.cross_entropy, rel=2e-2)


def test_register_metric_is_idempotent_and_newest(tmp_path):
    cache = tmp_path / "modules"
    shim = register_metric(cache)
    assert shim.parent.parent == cache / "evaluate_modules/metrics/evaluate-metric--merge_scaling"
    assert len(shim.parent.name) == 64 and (shim.parent / "__init__.py").exists()
    for package in ("evaluate_modules", "evaluate_modules/metrics"):
        assert (cache / package / "__init__.py").exists()

    other = shim.parent.parent / ("0" * 64) / "merge_scaling.py"  # e.g. another version's shim
    other.parent.mkdir()
    other.write_text("")
    os.utime(other, (shim.stat().st_mtime + 10,) * 2)
    assert register_metric(cache) == shim
    assert shim.stat().st_mtime > other.stat().st_mtime
    assert sorted(p.name for p in shim.parent.parent.iterdir() if len(p.name) == 64) == sorted(
        ["0" * 64, shim.parent.name]
    )


@pytest.mark.slow
def test_evaluate_load_by_name_offline_in_a_fresh_process(model, tokenizer, model_dir, tmp_path):
    hf_home = tmp_path / "hf_home"
    shim_path = register_metric(hf_home / "modules")
    script = textwrap.dedent(
        """
        import json, sys
        # An installed hf-mergelaw's import hook would register (and import us) by itself:
        # switch it off to test the shim alone in a process that never imported hf_mergelaw.
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "is_hf_mergelaw_hook", 0)]
        import evaluate
        assert "hf_mergelaw" not in sys.modules
        metric = evaluate.load("merge_scaling")
        print(json.dumps({
            "shims": [name for name in sys.modules if "evaluate-metric--merge_scaling" in name],
            "result": metric.compute(model=sys.argv[1], texts=sys.argv[2:]),
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env |= {
        "HF_HOME": str(hf_home),
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRITON_INTERPRET": "1",
        # Stands in for `pip install hf-mergelaw`: the shim imports the package by name.
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), *CORPUS],
        cwd=tmp_path,  # evaluate looks in ./merge_scaling/ first
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    shim = "evaluate_modules.metrics.evaluate-metric--merge_scaling.{}.merge_scaling"
    assert shim.format(shim_path.parent.name) in out["shims"]
    expected = cross_entropy(model, build_eval_set(tokenizer, texts=CORPUS))
    assert out["result"]["num_tokens"] == expected.num_tokens
    assert out["result"]["cross_entropy"] == pytest.approx(expected.cross_entropy, rel=1e-6)
