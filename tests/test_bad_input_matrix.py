"""Every surface, fed what a demanding user feeds it: each row is an input and the error it must
give (class and a phrase of the message), or the safe outcome that replaces a wrong result.

Surfaces: the sweep YAML, `hf-mergelaw sweep`, the law CLI, `triton_ops`, the metric, the Trainer
callback. Nothing here may end in a traceback, a silently wrong result or a lost file.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import hf_mergelaw
import triton_ops
from hf_mergelaw import MergeScalingCallback
from hf_mergelaw.checkpoints import Checkpoint
from hf_mergelaw.cli import main
from hf_mergelaw.cross_entropy import build_eval_set
from hf_mergelaw.errors import PoolError, SweepConfigError, UserError
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.provenance import Provenance, write_provenance
from hf_mergelaw.record_store import RecordStore
from hf_mergelaw.sweep_config import load_sweep_config
from hf_mergelaw.testing import save_model, tiny_llama_config
from tests.law_data import paper_sweep
from tests.tiny_models import SENTENCES, save_family, write_jsonl

USAGE_ERROR = 2


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"), num_experts=2)


def sweep_config(tmp_path: Path, family: tuple[Path, dict[str, Path]], **overrides: Any) -> dict:
    base, experts = family
    data = write_jsonl(tmp_path / "eval.jsonl", [{"text": text} for text in SENTENCES])
    config = {
        "base_model": str(base),
        "experts": {name: str(path) for name, path in experts.items()},
        "eval": {"data": str(data), "text_field": "text", "max_length": 32},
        "methods": [{"name": "average"}],
        "k": 1,
        "sampling": {"strategy": "all"},
        "output": str(tmp_path / "out" / "results.jsonl"),
        "dtype": "float32",
        "device": "cpu",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_yaml(tmp_path: Path, config: dict | str) -> Path:
    path = tmp_path / "sweep.yml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = main(list(argv))
    return status, capsys.readouterr().err


# --- the sweep YAML: refused before any work -----------------------------------------------


YAML_ROWS = [
    ("N is a bool", {"N": True}, "N=True must be a positive number"),
    ("per_k is a bool", {"sampling": {"strategy": "uniform", "per_k": True}}, "per_k=True"),
    ("k is an empty range", {"k": "5-2"}, "5-2 is an empty range"),
    ("eval.data is a list", {"eval": {"data": ["a.jsonl", "b.jsonl"]}}, "name one JSON-lines"),
    ("device cuda without CUDA", {"device": "cuda"}, "no CUDA device"),
    (
        "strategy all over 30 experts",
        {"experts": [f"e{i}" for i in range(30)], "k": "1-30"},
        "1,073,741,823 merges per method",
    ),
]


@pytest.mark.parametrize(("overrides", "phrase"), [row[1:] for row in YAML_ROWS],
                         ids=[row[0] for row in YAML_ROWS])  # fmt: skip
def test_sweep_yaml_is_refused(tmp_path, family, overrides, phrase) -> None:
    path = write_yaml(tmp_path, sweep_config(tmp_path, family, **overrides))
    with pytest.raises(SweepConfigError, match=phrase):
        load_sweep_config(path)


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path, family) -> None:
    text = yaml.safe_dump(sweep_config(tmp_path, family))
    text = text.replace("experts:\n", "experts:\n  expert0: /somewhere/else\n", 1)
    with pytest.raises(SweepConfigError, match="'expert0' is given twice"):
        load_sweep_config(write_yaml(tmp_path, text))


# --- hf-mergelaw sweep: cheap checks before models load, and no file lost ----------------


def test_eval_rows_that_are_not_objects_fail_with_file_and_line_before_the_pool_loads(
    tmp_path, family, capsys
) -> None:
    config = sweep_config(tmp_path, family, experts={"gone": str(tmp_path / "no-such-expert")})
    Path(config["eval"]["data"]).write_text('{"text": "fine"}\n[1, 2]\n')
    status, err = run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")
    assert status == USAGE_ERROR and "eval.jsonl:2 is a JSON list, not an object" in err


def test_a_json_eval_file_that_is_not_a_list_of_objects(tmp_path, family, capsys) -> None:
    data = tmp_path / "eval.json"
    data.write_text("[1, 2, 3]")
    config = sweep_config(tmp_path, family, eval={"data": str(data)})
    status, err = run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")
    assert status == USAGE_ERROR and "must hold a JSON list of objects" in err


def test_an_output_that_is_not_a_sweeps_records_is_left_untouched(tmp_path, family, capsys):
    config = sweep_config(tmp_path, family)
    config["output"] = config["eval"]["data"]  # the eval file, by mistake
    before = Path(config["output"]).read_bytes()
    status, err = run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")
    assert status == USAGE_ERROR and "is not a sweep record" in err
    assert Path(config["output"]).read_bytes() == before


def test_a_records_line_without_params_is_named(tmp_path, family, capsys) -> None:
    config = sweep_config(tmp_path, family)
    output = Path(config["output"])
    output.parent.mkdir()
    output.write_text(json.dumps({"method": "average", "k": 1, "subset": ["a"], "ce": 2.0}) + "\n")
    status, err = run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")
    assert status == USAGE_ERROR and "results.jsonl:1 is not a sweep record (no params)" in err


def test_a_base_without_tokenizer_files_asks_for_eval_tokenizer(tmp_path, family, capsys):
    _, experts = family
    config = sweep_config(tmp_path, family, base_model=str(experts["expert0"]))
    status, err = run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")
    assert status == USAGE_ERROR and "set eval.tokenizer" in err
    config["eval"]["tokenizer"] = str(family[0])
    assert run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")[0] == 0


def test_a_second_sweep_on_the_same_output_is_refused(tmp_path, family, capsys) -> None:
    config = sweep_config(tmp_path, family)
    store = RecordStore(config["output"])
    with store.exclusive():
        status, err = run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")
    assert status == USAGE_ERROR and "another sweep is writing" in err


CHANGES = [
    ("eval max_length", {"eval": {"max_length": 4}}, "the eval set"),  # truncates
    ("dtype", {"dtype": "bfloat16"}, "dtype (float32 -> bfloat16)"),
    ("N", {"N": 7}, "N ("),
    ("method parameters", {"methods": [{"name": "ties", "label": "average"}]}, "parameters of"),
]


@pytest.mark.parametrize(("change", "phrase"), [row[1:] for row in CHANGES],
                         ids=[row[0] for row in CHANGES])  # fmt: skip
def test_resuming_with_another_configuration_stops_and_names_the_change(
    tmp_path, family, capsys, change, phrase
) -> None:
    first = write_yaml(tmp_path, sweep_config(tmp_path, family))
    assert run_cli(capsys, "sweep", str(first), "--no-progress")[0] == 0
    changed = write_yaml(tmp_path, sweep_config(tmp_path, family, **change))
    status, err = run_cli(capsys, "sweep", str(changed), "--no-progress")
    assert status == USAGE_ERROR and phrase in err and "--restart" in err
    assert run_cli(capsys, "sweep", str(changed), "--no-progress", "--restart")[0] == 0
    assert list((tmp_path / "out").glob("results.replaced-*.jsonl"))


def test_an_expert_rewritten_behind_the_same_name_stops_a_resume(tmp_path, family, capsys):
    base, experts = save_family(tmp_path / "own", num_experts=2)
    config = sweep_config(tmp_path, (base, experts))
    assert run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")[0] == 0
    model = AutoModelForCausalLM.from_pretrained(experts["expert1"])
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    model.save_pretrained(experts["expert1"])
    status, err = run_cli(capsys, "sweep", str(write_yaml(tmp_path, config)), "--no-progress")
    assert status == USAGE_ERROR and "expert 'expert1' (its weights changed)" in err


def test_fit_and_plot_outputs_never_replace_the_records(tmp_path, capsys) -> None:
    three = save_family(tmp_path / "three", num_experts=3)
    config = sweep_config(tmp_path, three, k="1-3", output=str(tmp_path / "out" / "results.png"))
    path = write_yaml(tmp_path, config)
    status, err = run_cli(capsys, "sweep", str(path), "--no-progress", "--fit", "--plot")
    assert status == 0, err
    records = list(RecordStore(tmp_path / "out" / "results.png"))
    assert len(records) == 7
    assert (tmp_path / "out" / "results.law.png").stat().st_size > 1000


def test_a_folder_with_single_file_and_sharded_weights_is_refused(tmp_path) -> None:
    stale = tmp_path / "reused"
    save_model(LlamaForCausalLM(tiny_llama_config()), stale)
    (stale / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(PoolError, match=r"holds both model\.safetensors"):
        Checkpoint(stale, "expert 'reused'")


# --- the law CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("law")
    records = write_jsonl(folder / "sweep.jsonl", paper_sweep("average", "code", seed=0))
    out = folder / "fit.json"
    assert main(["fit", str(records), "--form", "joint", "-o", str(out)]) == 0
    return out


LAW_ROWS = [
    ("k-max 0", ["plan", "{fit}", "--k-max", "0"], "--k-max '0'"),
    ("k-max negative", ["plan", "{fit}", "--k-max", "-3"], "--k-max '-3'"),
    ("k-max huge", ["plan", "{fit}", "--k-max", "100000000"], "<= 1000"),
    ("level -1", ["plan", "{fit}", "--level", "-1"], "lies in (0, 1)"),
    ("level 0", ["plan", "{fit}", "--level", "0"], "lies in (0, 1)"),
    ("level 1", ["predict", "{fit}", "--level", "1"], "lies in (0, 1)"),
    ("level 1.5", ["plan", "{fit}", "--level", "1.5"], "lies in (0, 1)"),
    ("target nan", ["plan", "{fit}", "--target-loss", "nan"], "give a finite number"),
    ("k up to 1e9", ["predict", "{fit}", "--k", "1-1000000000"], "at most 100000"),
    ("k empty range", ["predict", "{fit}", "--k", "5-2"], "5-2 is an empty range"),
    ("negative size", ["predict", "{fit}", "--N", "-7"], "above 0"),
]


@pytest.mark.parametrize(("argv", "phrase"), [row[1:] for row in LAW_ROWS],
                         ids=[row[0] for row in LAW_ROWS])  # fmt: skip
def test_law_cli_arguments_are_refused(fit_file, capsys, argv, phrase) -> None:
    argv = [a.format(fit=fit_file) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == USAGE_ERROR
    assert phrase in capsys.readouterr().err


FILE_ROWS = [
    ("a fit file that is not a fit", {"fits": [{"group": {}}]}, "damaged"),
    ("a fit file that is a list", [1, 2], "not a fit file"),
]


@pytest.mark.parametrize(("content", "phrase"), [row[1:] for row in FILE_ROWS],
                         ids=[row[0] for row in FILE_ROWS])  # fmt: skip
def test_damaged_fit_files_are_named(tmp_path, capsys, content, phrase) -> None:
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(content))
    status, err = run_cli(capsys, "plan", str(path))
    assert status == USAGE_ERROR and phrase in err


FORMULA_ROWS = [
    ("thousands of terms", "+".join(["a * k"] * 3000), "characters long"),
    ("too deep", "(" * 400 + "a" + ")" * 400 + " * k", "too many nested parentheses"),
]


@pytest.mark.parametrize(("form", "phrase"), [row[1:] for row in FORMULA_ROWS],
                         ids=[row[0] for row in FORMULA_ROWS])  # fmt: skip
def test_formula_forms_out_of_reason_are_refused(tmp_path, capsys, form, phrase) -> None:
    records = write_jsonl(tmp_path / "r.jsonl", paper_sweep("average", "code", seed=1))
    status, err = run_cli(capsys, "fit", str(records), "--form", form, "--param", "a=0:1")
    assert status == USAGE_ERROR and any(p in err for p in phrase.split("|"))


def test_an_overflowing_constant_is_a_poor_fit_not_a_crash(tmp_path, capsys) -> None:
    records = write_jsonl(tmp_path / "r.jsonl", paper_sweep("average", "code", seed=1))
    status, _ = run_cli(capsys, "fit", str(records), "--form", "c + 9**9**9**9 * 0 * k",
                        "--param", "c=0:10")  # fmt: skip
    assert status in (0, USAGE_ERROR)


def test_output_into_a_missing_folder_names_the_folder(tmp_path, fit_file, capsys) -> None:
    status, err = run_cli(capsys, "predict", str(fit_file), "-o", str(tmp_path / "no" / "p.json"))
    assert status == USAGE_ERROR and f"the folder {tmp_path / 'no'} does not exist" in err


def test_one_label_with_two_parameter_sets_is_not_fitted_as_one_curve(tmp_path, capsys) -> None:
    rows = [
        {"method": "ties", "params": {"density": d}, "k": k, "subset": [f"e{i}" for i in range(k)],
         "ce": 2 + 1 / k + d}
        for d in (0.5, 0.2)
        for k in (1, 2, 3, 4)
    ]  # fmt: skip
    status, err = run_cli(capsys, "fit", str(write_jsonl(tmp_path / "r.jsonl", rows)),
                          "--form", "per-size", "--by", "method")  # fmt: skip
    assert status == USAGE_ERROR and "2 parameter sets" in err and "label" in err


def test_a_plan_of_a_curve_that_rises_with_k_says_so(tmp_path, capsys) -> None:
    rows = [{"k": k, "ce": 2.0 + 0.01 * k + 0.003 * (s % 3)} for k in range(1, 8) for s in range(4)]
    records = write_jsonl(tmp_path / "rising.jsonl", rows)
    fit = tmp_path / "fit.json"
    assert main(["fit", str(records), "--form", "per-size", "-o", str(fit)]) == 0
    capsys.readouterr()
    assert main(["plan", str(fit), "--json", "--min-gain", "0.001"]) == 0
    notes = json.loads(capsys.readouterr().out)["plans"][0]["notes"]
    assert any("does not fall as experts are added" in note for note in notes)


# --- triton_ops --------------------------------------------------------------------------

BASE = torch.zeros(64)
EXPERTS = [torch.ones(64), -torch.ones(64)]

KERNEL_ROWS = [
    (
        "a NaN scale",
        lambda: triton_ops.merge_task_vectors(BASE, EXPERTS, weights=[0.5, 0.5],
                                              scales=[math.nan, 1.0]),
        r"scales\[0\] is nan",
    ),
    (
        "a float for weights",
        lambda: triton_ops.ties_merge(BASE, EXPERTS, weights=0.3, densities=[1.0, 1.0]),
        "pass a sequence with one value per expert",
    ),
    (
        "meta tensors",
        lambda: triton_ops.task_arithmetic(BASE.to("meta"), [e.to("meta") for e in EXPERTS],
                                           weights=[0.5, 0.5]),
        "meta tensor",
    ),
    (
        "a meta task vector",
        lambda: triton_ops.trim(torch.ones(8, device="meta"), 0.5),
        "meta tensor",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("call", "phrase"), [row[1:] for row in KERNEL_ROWS],
                         ids=[row[0] for row in KERNEL_ROWS])  # fmt: skip
def test_kernel_inputs_are_refused(call, phrase) -> None:
    with pytest.raises(ValueError, match=phrase):
        call()


def test_a_numpy_integer_is_a_seed() -> None:
    merged = triton_ops.dare_merge(BASE, EXPERTS, weights=[0.5, 0.5], densities=[0.5, 0.5],
                                   seed=np.int64(3))  # fmt: skip
    assert torch.isfinite(merged).all()


# --- the metric ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric() -> evaluate.EvaluationModule:
    return evaluate.load(hf_mergelaw.metric_path())


@pytest.fixture(scope="module")
def short_model(family, tmp_path_factory) -> Path:
    """A model that attends to 16 positions only."""
    base, _ = family
    model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=16))
    return save_model(model, tmp_path_factory.mktemp("short"), AutoTokenizer.from_pretrained(base))


def test_an_empty_domain_is_not_a_domain(metric, family) -> None:
    with pytest.raises(UserError, match=r"domains\[0\] is empty"):
        metric.compute(model=str(family[0]), texts=list(SENTENCES[:2]), domains=["", "d"])


def test_batches_with_and_without_domains_do_not_invent_one(metric, family) -> None:
    metric.add_batch(texts=list(SENTENCES[:2]), domains=["a", "b"])
    metric.add_batch(texts=list(SENTENCES[2:4]))
    with pytest.raises(UserError, match=r"domains\[2\] is empty"):
        metric.compute(model=str(family[0]))


def test_max_length_beyond_the_models_context_is_lowered_with_a_warning(metric, short_model):
    long_text = " ".join(SENTENCES * 3)
    with pytest.warns(UserWarning, match="longer than the model's 16 positions"):
        result = metric.compute(model=str(short_model), texts=[long_text])
    assert result["num_tokens"] == 15


def test_a_missing_model_folder_says_no_such_folder(metric, tmp_path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        metric.compute(model=str(tmp_path / "models" / "missing"), texts=["a b"])


# --- the Trainer callback ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool_and_eval(family) -> tuple[ExpertPool, Any]:
    base, experts = family
    pool = ExpertPool(base, experts, dtype=torch.float32)
    return pool, build_eval_set(AutoTokenizer.from_pretrained(base), texts=list(SENTENCES))


CALLBACK_ROWS = [
    ("eval data as a list", {"eval_data": list(SENTENCES)}, "must be an EvalSet"),
    ("batch_size 0", {"batch_size": 0}, "batch_size=0 must be a positive integer"),
    ("per_k 0", {"per_k": 0}, "per_k=0 must be a positive integer"),
    ("a string as the pool", {"pool": "base/"}, "pool must be an ExpertPool"),
    ("target loss nan", {"target_loss": math.nan}, "target_loss=nan"),
]


@pytest.mark.parametrize(("change", "phrase"), [row[1:] for row in CALLBACK_ROWS],
                         ids=[row[0] for row in CALLBACK_ROWS])  # fmt: skip
def test_callback_arguments_are_checked_when_it_is_made(pool_and_eval, change, phrase) -> None:
    pool, eval_set = pool_and_eval
    arguments = {"pool": pool, "eval_data": eval_set, **change}
    with pytest.raises(UserError, match=phrase):
        MergeScalingCallback(None, **arguments)


def tiny_trainer(tmp_path: Path, model: Any, base: Path) -> Trainer:
    tokenizer = AutoTokenizer.from_pretrained(base)
    train = Dataset.from_dict({"text": list(SENTENCES)}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(tmp_path / "run", max_steps=1, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True)  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, train_dataset=train, data_collator=collator)


def test_a_model_of_another_architecture_fails_before_training(tmp_path, family, pool_and_eval):
    pool, eval_set = pool_and_eval
    trainer = tiny_trainer(tmp_path, LlamaForCausalLM(tiny_llama_config(vocab_size=80)), family[0])
    trainer.add_callback(MergeScalingCallback(trainer, pool, eval_set))
    with pytest.raises(PoolError, match="vocab_size=80"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_records_of_an_earlier_run_in_the_output_dir_stop_training_at_its_start(
    tmp_path, family, pool_and_eval
) -> None:
    pool, eval_set = pool_and_eval
    trainer = tiny_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(family[0]), family[0])
    records = tmp_path / "run" / "merge_scaling" / "results.jsonl"
    records.parent.mkdir(parents=True)
    records.touch()
    earlier = Provenance(base="b", eval="e", dtype="float32", device="cpu", N=0.0, version="0",
                         experts={**pool.identities, "math-sft": "earlier-weights"})  # fmt: skip
    write_provenance(records, earlier)
    trainer.add_callback(MergeScalingCallback(trainer, pool, eval_set))
    with pytest.raises(UserError, match=r"experts this pool does not have \(math-sft\)"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_failure_after_training_is_logged_and_training_returns(tmp_path, family, caplog):
    base, experts = family
    pool = ExpertPool(base, experts, dtype=torch.float32)
    eval_set = build_eval_set(AutoTokenizer.from_pretrained(base), texts=list(SENTENCES))
    trainer = tiny_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(base), base)
    (tmp_path / "run" / "merge_scaling" / "results.jsonl").mkdir(parents=True)  # unwritable
    trainer.add_callback(MergeScalingCallback(trainer, pool, eval_set))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.state.global_step == 1
    assert "the merge law was not measured" in caplog.text and "is a folder" in caplog.text
