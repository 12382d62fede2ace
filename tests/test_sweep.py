"""The in-memory k-sweep: records, agreement with mergekit, resume, PEFT experts, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mergekit.merge_methods.api import merge_state_dicts
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hf_mergelaw.cli import main
from hf_mergelaw.cross_entropy import build_eval_set, cross_entropy
from hf_mergelaw.errors import RecordsFileError, SweepConfigError
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.files import read_json
from hf_mergelaw.pool_model.prior import priors_path
from hf_mergelaw.record_schema import records_by_domain
from hf_mergelaw.record_store import RecordStore
from hf_mergelaw.sweep import plan_jobs, run_sweep, sweep_pool
from hf_mergelaw.sweep_config import SamplingConfig, load_sweep_config, parse_sweep_config
from hf_mergelaw.sweep_methods import MethodSpec
from hf_mergelaw.testing import save_model, tiny_llama_config
from tests.tiny_models import SENTENCES, save_family, sweep_yaml, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"), num_experts=4)


def test_sweep_writes_one_complete_record_per_merged_model(tmp_path, family) -> None:
    config = load_sweep_config(sweep_yaml(tmp_path, family))
    summary = run_sweep(config, progress=False)
    records = list(RecordStore(config.output))
    # C(4,1) + C(4,2) + C(4,3) subsets for each of the two methods.
    assert summary.planned == summary.written == len(records) == 2 * (4 + 6 + 4)
    keys = {(r["method"], tuple(r["subset"])) for r in records}
    assert len(keys) == len(records)
    n_params = sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config()).parameters())
    for record in records:
        assert record["k"] == len(record["subset"])
        assert record["N"] == pytest.approx(n_params / 1e9)
        assert record["domain"] == "macro"
        per_domain = [v["ce"] for v in record["per_domain"].values()]
        assert record["ce"] == pytest.approx(sum(per_domain) / len(per_domain))
        assert record["num_tokens"] == sum(v["num_tokens"] for v in record["per_domain"].values())
        assert record["merge_s"] >= 0 and record["eval_s"] > 0
    rows = records_by_domain(records)
    assert {r["domain"] for r in rows} == {"macro", "a", "b"}


@pytest.mark.parametrize(
    ("spec", "mergekit_method", "parameters"),
    [
        ({"name": "ties", "density": 0.5}, "ties", {"density": 0.5}),
        ({"name": "task_arithmetic", "lambda": 0.8}, "task_arithmetic", {"lambda": 0.8}),
    ],
)
def test_record_ce_equals_evaluating_the_mergekit_merge(
    tmp_path, family, spec, mergekit_method, parameters
) -> None:
    base, experts = family
    subset = ["expert1", "expert3"]
    pool = ExpertPool(base, experts, dtype=torch.float32, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(base)
    eval_set = build_eval_set(tokenizer, texts=list(SENTENCES), max_length=32)
    pool.merge(MethodSpec.from_config(spec), subset)
    ours = cross_entropy(pool.model, eval_set).cross_entropy

    state_dicts = {"base": _state_dict(base)} | {n: _state_dict(experts[n]) for n in subset}
    merged = merge_state_dicts(
        state_dicts, mergekit_method, base="base", parameters={"weight": 0.5, **parameters}
    )
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference.load_state_dict(merged)
    assert ours == pytest.approx(cross_entropy(reference, eval_set).cross_entropy, rel=1e-6)


SWEEP_SCRIPT = (
    "import sys; from hf_mergelaw.sweep import run_sweep; "
    "from hf_mergelaw.sweep_config import load_sweep_config; "
    "run_sweep(load_sweep_config(sys.argv[1]))"
)


def _sweep_process(config_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SWEEP_SCRIPT, str(config_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _kill_after(process: subprocess.Popen, output: Path, lines: int) -> int:
    """SIGKILL the sweep once ``output`` holds ``lines`` records; the records it left."""
    deadline = time.monotonic() + 120
    while _count_lines(output) < lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return _count_lines(output)


def test_killed_sweep_resumes_without_duplicates_or_gaps(tmp_path, family) -> None:
    config_path = sweep_yaml(tmp_path, family, k="1-4")
    output = load_sweep_config(config_path).output
    interrupted = _kill_after(_sweep_process(config_path), output, 5)
    assert 5 <= interrupted < 30, "the kill should land mid-sweep"

    summary = run_sweep(load_sweep_config(config_path), progress=False)
    records = list(RecordStore(output))
    assert summary.skipped == interrupted
    assert len(records) == summary.planned == 30
    assert len({(r["method"], tuple(r["subset"])) for r in records}) == 30


# Adaptive sweeps: 4 experts, k = 1-3; the pool model needs 10 merges per method to start.
ADAPTIVE = {"strategy": "adaptive", "budget": 12, "seed": 0}


def _merges(records: list[dict]) -> dict[tuple[str, frozenset[str]], float]:
    return {(r["method"], frozenset(r["subset"])): r["ce"] for r in records}


def stored_kinds(output: Path) -> dict[str, str]:
    """The kind of prior an adaptive sweep kept beside its records, per method."""
    if not priors_path(output).exists():
        return {}
    return {m: e["kind"] for m, e in read_json(priors_path(output), "priors")["priors"].items()}


METHODS = ("average", "ties")


def test_adaptive_sweep_merges_at_most_its_budget_of_fresh_subsets(tmp_path, family) -> None:
    config = load_sweep_config(sweep_yaml(tmp_path, family, sampling=ADAPTIVE))
    summary = run_sweep(config, progress=False)
    records = list(RecordStore(config.output))
    assert stored_kinds(config.output) == {"average": "weights"}  # TIES's vectors do not add
    for method in ("average", "ties"):
        mine = [r for r in records if r["method"] == method]
        assert 10 <= len(mine) <= ADAPTIVE["budget"]
        assert len({frozenset(r["subset"]) for r in mine}) == len(mine)
        assert {r["k"] for r in mine} == {1, 2, 3}
    assert summary.planned == summary.written == len(records)
    assert set(summary.stopped) == {"average", "ties"}

    again = run_sweep(config, progress=False)  # the answer is where it was left: nothing to do
    assert (again.written, again.skipped, again.stopped) == (0, len(records), summary.stopped)
    more = replace(config, sampling=replace(config.sampling, budget=ADAPTIVE["budget"] + 1))
    grown = run_sweep(more, progress=False)  # a larger budget goes on from the records
    after = list(RecordStore(config.output))
    assert grown.skipped == len(records) and grown.planned == len(after) <= 2 * 13
    assert _merges(after).items() >= _merges(records).items()
    assert len(_merges(after)) == len(after)


@pytest.mark.parametrize(("prior", "start"), [("curvature", 9), ("none", 10)])
def test_adaptive_sweep_takes_the_prior_it_is_given(tmp_path, family, prior, start) -> None:
    sampling = {**ADAPTIVE, "budget": start + 1, "prior": prior}
    config = load_sweep_config(sweep_yaml(tmp_path, family, sampling=sampling))
    summary = run_sweep(config, progress=False)
    records = list(RecordStore(config.output))
    assert summary.stopped == {m: f"budget spent: {start + 1} merges (budget {start + 1})"
                               for m in ("average", "ties")}  # fmt: skip
    assert len(records) == 2 * (start + 1)
    assert stored_kinds(config.output) == ({} if prior == "none" else dict.fromkeys(METHODS, prior))
    with pytest.raises(SweepConfigError, match=rf"needs {start} merges per method"):
        load_sweep_config(sweep_yaml(tmp_path, family, sampling={**sampling, "budget": start - 1}))


def test_pool_fit_fits_an_adaptive_sweeps_records_with_the_priors_it_kept(
    tmp_path, family, capsys
) -> None:
    sampling = {**ADAPTIVE, "budget": 9, "prior": "curvature"}  # below the 10 of no prior
    config = load_sweep_config(sweep_yaml(tmp_path, family, sampling=sampling))
    run_sweep(config, progress=False)
    capsys.readouterr()
    assert main(["pool", "fit", str(config.output), "--json"]) == 0
    pools = json.loads(capsys.readouterr().out)["pools"]
    assert {p["source"]["prior"]["kind"] for p in pools} == {"curvature"}
    assert {p["n_records"] for p in pools} == {9}
    assert main(["pool", "fit", str(config.output), "--no-prior"]) == 2
    assert "needs at least 10" in capsys.readouterr().err


def test_pool_fit_takes_a_prior_computed_from_the_sweeps_pool(tmp_path, family, capsys) -> None:
    yaml_path = sweep_yaml(tmp_path, family)  # every subset of k = 1-3, average and TIES
    config = load_sweep_config(yaml_path)
    run_sweep(config, progress=False)
    capsys.readouterr()
    argv = ["pool", "fit", str(config.output), "--prior", "weights", "--sweep", str(yaml_path)]
    assert main([*argv, "--json"]) == 0
    pools = json.loads(capsys.readouterr().out)["pools"]
    kinds = {(p["group"]["method"], p["source"].get("prior", {}).get("kind")) for p in pools}
    assert kinds == {("average", "weights"), ("ties", None)}  # TIES takes no weight prior


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prior", "weights"], "--prior and --sweep go together"),
        (["--prior", "weights", "--sweep", "{yaml}", "--no-prior"], "contradict each other"),
    ],
)
def test_pool_fit_prior_options_are_checked(tmp_path, family, capsys, extra, message) -> None:
    yaml_path = sweep_yaml(tmp_path, family)
    argv = ["pool", "fit", "r.jsonl", *[a.format(yaml=yaml_path) for a in extra]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_killed_adaptive_sweep_resumes_to_the_merges_of_an_uninterrupted_one(
    tmp_path, family
) -> None:
    sampling = {**ADAPTIVE, "budget": 13}
    killed = sweep_yaml(tmp_path / "killed", family, sampling=sampling)
    whole = sweep_yaml(tmp_path / "whole", family, sampling=sampling)
    reference = _sweep_process(whole)
    output = load_sweep_config(killed).output
    interrupted = _kill_after(_sweep_process(killed), output, 11)
    assert 11 <= interrupted < 26, "the kill should land in the rounds"
    assert reference.wait(timeout=300) == 0

    summary = run_sweep(load_sweep_config(killed), progress=False)
    resumed = list(RecordStore(output))
    assert summary.skipped == interrupted and summary.planned == len(resumed)
    assert _merges(resumed) == _merges(RecordStore(load_sweep_config(whole).output))
    assert len(_merges(resumed)) == len(resumed)


def torchrun_sweep(config_path: Path) -> subprocess.CompletedProcess[str]:
    """``hf-mergelaw sweep`` under ``torch.distributed.run`` with two processes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.run(
        [*launch, "-m", "hf_mergelaw", "sweep", str(config_path), "--no-progress", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_torchrun_processes_share_an_adaptive_sweep_one_pick_each(tmp_path, family) -> None:
    config_path = sweep_yaml(tmp_path, family, sampling=ADAPTIVE)
    result = torchrun_sweep(config_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = list(RecordStore(load_sweep_config(config_path).output))
    per_method = {m: sum(r["method"] == m for r in records) for m in ("average", "ties")}
    written = sorted(int(n) for n in re.findall(r'"written": (\d+)', result.stdout))
    # Each rank: half the 10-merge start, then one pick of each round, for both methods.
    assert written == [sum(per_method.values()) // 2] * 2
    assert len(_merges(records)) == len(records) and max(per_method.values()) <= 12


def test_adaptive_sweep_from_python_checks_its_budget(family) -> None:
    base, experts = family
    pool = ExpertPool(base, experts, dtype=torch.float32, device="cpu")
    eval_set = build_eval_set(AutoTokenizer.from_pretrained(base), texts=list(SENTENCES))
    methods = [MethodSpec.from_config({"name": "average"})]
    sampling = SamplingConfig("adaptive", budget=9)
    with pytest.raises(SweepConfigError, match=r"needs 10 merges .* at least 10"):
        sweep_pool(pool, eval_set, methods=methods, ks=[1, 2, 3], sampling=sampling, output="o")
    sampling = SamplingConfig("adaptive", budget=20, prior="gram")
    with pytest.raises(SweepConfigError, match=r"sampling.prior='gram'; use one of weights, "):
        sweep_pool(pool, eval_set, methods=methods, ks=[1, 2, 3], sampling=sampling, output="o")


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"strategy": "adaptive"}, r"strategy 'adaptive' needs budget"),
        ({"strategy": "adaptive", "budget": 0}, r"sampling.budget=0: .* positive integer"),
        ({"strategy": "adaptive", "budget": "ten"}, r"sampling.budget='ten': .* positive integer"),
        ({"strategy": "adaptive", "budget": 9}, r"needs 10 merges per method .* at least 10"),
        ({"strategy": "adaptive", "budget": 20, "per_k": 4}, r"per_k does not apply"),
        ({"strategy": "balanced", "budget": 20}, r"budget is for strategy 'adaptive'"),
        ({"strategy": "adaptiv", "budget": 20}, r"use one of .*permutations, adaptive"),
        ({"strategy": "adaptive", "budget": 20, "prior": "gram"}, r"prior='gram'; use one of"),
        ({"strategy": "uniform", "prior": "none"}, r"prior is for strategy 'adaptive'"),
    ],
)
def test_bad_adaptive_sampling_is_named_with_the_fix(tmp_path, family, sampling, message) -> None:
    with pytest.raises(SweepConfigError, match=message):
        load_sweep_config(sweep_yaml(tmp_path, family, sampling=sampling))


def test_adaptive_sweep_of_one_size_is_refused(tmp_path, family) -> None:
    with pytest.raises(SweepConfigError, match=r"two or more sizes below .* k has 1"):
        load_sweep_config(sweep_yaml(tmp_path, family, k=2, sampling=ADAPTIVE))


def record(k: int) -> dict:
    return {"method": "average", "params": {}, "k": k, "subset": [f"e{i}" for i in range(k)],
            "ce": 2.0 / k}  # fmt: skip


def test_partial_last_line_from_a_crash_is_dropped(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record(1)) + '\n{"k": 2, "c')
    results = RecordStore(path)
    assert list(results) == [record(1)]
    results.append(record(2))
    assert [r["k"] for r in RecordStore(path)] == [1, 2]


def test_a_file_that_is_not_a_sweeps_records_is_refused_untouched(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "a held-out row"}\n{"text": "the last row, no newline"}')
    before = path.read_bytes()
    with pytest.raises(RecordsFileError, match=r"eval.jsonl:1 is not a sweep record"):
        RecordStore(path).append(record(1))
    assert path.read_bytes() == before


def test_lora_adapter_joins_the_pool_as_its_densified_update(tmp_path, family) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base, experts = family
    torch.manual_seed(3)
    adapter_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), adapter_config)
    peft_model.save_pretrained(tmp_path / "adapter")

    pool = ExpertPool(base, {"lora": tmp_path / "adapter", **experts}, dtype=torch.float32)
    densified = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    ).merge_and_unload()
    pool.merge(MethodSpec.from_config({"name": "average"}), ["lora"])
    for name, parameter in pool.model.named_parameters():
        torch.testing.assert_close(parameter, dict(densified.named_parameters())[name])
    adapted = {n for n in pool.parameters if n not in pool.experts["lora"].same_as_base}
    assert adapted and all("q_proj" in n or "v_proj" in n for n in adapted)


def test_experts_from_a_list_are_named_after_their_directories(family) -> None:
    base, experts = family
    pool = ExpertPool(base, list(experts.values())[:2], dtype=torch.float32)
    assert pool.names == ["expert0", "expert1"]


def test_plan_is_stable_and_covers_every_method_and_k(family) -> None:
    config = parse_sweep_config(
        {"base_model": "b", "experts": ["e1", "e2", "e3"], "eval": {"data": "d.jsonl",
         "text_field": "text"}, "methods": [{"name": "average"}, {"name": "dare_ties",
         "density": 0.8}], "k": [1, 3], "sampling": {"strategy": "uniform", "per_k": 2},
         "output": "o.jsonl"}
    )  # fmt: skip
    jobs = plan_jobs(config.methods, config.k, ["e1", "e2", "e3"], config.sampling)
    assert jobs == plan_jobs(config.methods, config.k, ["e1", "e2", "e3"], config.sampling)
    assert [(j.method.name, j.k) for j in jobs] == [
        ("average", 1), ("average", 1), ("average", 3),
        ("dare_ties", 1), ("dare_ties", 1), ("dare_ties", 3),
    ]  # fmt: skip


# Bad input: every message names the problem and the fix.


def test_unknown_yaml_key_is_named(tmp_path, family) -> None:
    with pytest.raises(SweepConfigError, match="unknown key 'batchsize' in eval"):
        load_sweep_config(sweep_yaml(tmp_path, family, eval={"data": "x", "batchsize": 2}))


def test_k_larger_than_the_pool_is_refused_before_loading(tmp_path, family) -> None:
    with pytest.raises(SweepConfigError, match="k goes up to 7 but the pool has 4 experts"):
        load_sweep_config(sweep_yaml(tmp_path, family, k="1-7"))


def test_unknown_method_parameter_is_named(tmp_path, family) -> None:
    methods = [{"name": "ties", "densty": 0.5}]
    with pytest.raises(SweepConfigError, match=r"methods\[0\].*'densty'.*density"):
        load_sweep_config(sweep_yaml(tmp_path, family, methods=methods))


def test_missing_expert_checkpoint_is_named(tmp_path, family) -> None:
    base, experts = family
    with pytest.raises(FileNotFoundError, match="expert 'ghost'"):
        ExpertPool(base, {**experts, "ghost": tmp_path / "nowhere"})


def test_expert_with_other_shapes_is_named_with_the_tensor(tmp_path, family) -> None:
    base, _ = family
    wider = save_model(LlamaForCausalLM(tiny_llama_config(intermediate_size=64)), tmp_path / "w")
    with pytest.raises(ValueError, match=r"expert 'wide': tensor 'model\.layers\.0\.mlp\..*shape"):
        ExpertPool(base, {"wide": wider})


def test_expert_with_another_vocabulary_is_refused(tmp_path, family) -> None:
    base, _ = family
    other = save_model(LlamaForCausalLM(tiny_llama_config(vocab_size=80)), tmp_path / "v")
    with pytest.raises(ValueError, match="expert 'other' has vocab_size=80 but the base"):
        ExpertPool(base, {"other": other})


def test_empty_eval_set_is_refused(tmp_path, family) -> None:
    config_path = sweep_yaml(tmp_path, family)
    write_jsonl(tmp_path / "eval.jsonl", [])
    with pytest.raises(SweepConfigError, match="is empty"):
        run_sweep(load_sweep_config(config_path), progress=False)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict())


def _count_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_records_are_valid_json_lines(tmp_path, family) -> None:
    config = load_sweep_config(sweep_yaml(tmp_path, family, k=1))
    run_sweep(config, progress=False)
    for line in config.output.read_text().splitlines():
        assert json.loads(line)["k"] == 1


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_streamed_storage_merges_exactly_like_in_memory(family, storage) -> None:
    base, experts = family
    method = MethodSpec.from_config({"name": "dare_ties", "density": 0.7, "seed": 3})
    merged = {}
    for mode in ("device", storage):
        pool = ExpertPool(base, experts, dtype=torch.bfloat16, storage=mode)
        pool.merge(method, ["expert0", "expert2", "expert3"])
        merged[mode] = {n: p.detach().clone() for n, p in pool.model.named_parameters()}
    for name, tensor in merged["device"].items():
        assert torch.equal(tensor, merged[storage][name]), name


def test_two_torchrun_processes_share_one_sweep(tmp_path, family) -> None:
    config_path = sweep_yaml(tmp_path, family, k="1-2")
    result = torchrun_sweep(config_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written_per_rank = sorted(int(n) for n in re.findall(r'"written": (\d+)', result.stdout))
    assert written_per_rank == [10, 10]  # each rank half of 2 methods x (4 + 6) subsets
    output = load_sweep_config(config_path).output
    records = list(RecordStore(output))
    assert len({(r["method"], tuple(r["subset"])) for r in records}) == len(records) == 20
    assert not list(output.parent.glob("*.rank-*"))


def test_pickled_bin_checkpoint_loads_weights_only_and_merges_like_safetensors(
    tmp_path, family
) -> None:
    base, experts = family
    source = AutoModelForCausalLM.from_pretrained(experts["expert1"])
    pickled = tmp_path / "expert1-bin"
    pickled.mkdir()
    source.config.save_pretrained(pickled)
    torch.save(source.state_dict(), pickled / "pytorch_model.bin")
    method = MethodSpec.from_config({"name": "ties", "density": 0.5})
    merged = []
    for expert in (experts["expert1"], pickled):
        pool = ExpertPool(base, {"e0": experts["expert0"], "e1": expert}, dtype=torch.float32)
        pool.merge(method, ["e0", "e1"])
        merged.append({n: p.detach().clone() for n, p in pool.model.named_parameters()})
    for name, tensor in merged[0].items():
        assert torch.equal(tensor, merged[1][name]), name


def test_pickled_checkpoint_that_needs_unpickling_code_is_refused(tmp_path, family) -> None:
    base, _ = family
    pickled = tmp_path / "unsafe"
    pickled.mkdir()
    tiny_llama_config().save_pretrained(pickled)
    torch.save({"weights": Path("not a tensor")}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        ExpertPool(base, {"unsafe": pickled})
