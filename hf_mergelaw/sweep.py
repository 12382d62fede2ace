"""The k-sweep: merge many subsets of k experts in memory, measure cross-entropy, record each.

The paper wrote every merged model to disk and evaluated it in a separate job. Here the experts are
loaded once (`ExpertPool`), every subset is merged by the fused kernels into one reusable model,
evaluated at once on pre-tokenized data, and appended as one JSON line. A re-run skips what is
already recorded, so an interrupted sweep resumes where it stopped.

Several GPUs or nodes share a sweep under `accelerate launch` or `torchrun`: accelerate's
`PartialState.split_between_processes` gives each rank its share of the jobs, each rank appends to
its own file, and the main process gathers them into the output at the end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .cross_entropy import EvalSet, build_eval_set, cross_entropy
from .eval_data import load_eval_columns
from .experts import ExpertPool
from .record_schema import job_key, make_record, record_key
from .record_store import RecordStore
from .subsets import sample_subsets
from .sweep_config import SamplingConfig, SweepConfig
from .sweep_methods import MethodSpec


@dataclass(frozen=True)
class Job:
    """Merge `subset` with `method` and evaluate it: one record."""

    method: MethodSpec
    k: int
    subset: tuple[str, ...]

    @property
    def key(self) -> str:
        return job_key(self.method.label, dict(self.method.params), self.subset)


@dataclass(frozen=True)
class SweepSummary:
    output: Path
    planned: int
    written: int
    skipped: int


def plan_jobs(
    methods: Sequence[MethodSpec],
    ks: Sequence[int],
    expert_names: Sequence[str],
    sampling: SamplingConfig,
) -> list[Job]:
    """Every (method, k, subset) of a sweep, in a stable order."""
    jobs = []
    for method in methods:
        for k in ks:
            for subset in sample_subsets(
                len(expert_names),
                k,
                strategy=sampling.strategy,
                per_k=sampling.per_k,
                seed=sampling.seed,
            ):
                jobs.append(Job(method, k, tuple(expert_names[i] for i in subset)))
    return jobs


def run_sweep(config: SweepConfig, *, progress: bool = True) -> SweepSummary:
    """Run the sweep a YAML describes (see `sweep_config`)."""
    from transformers import AutoTokenizer

    pool = ExpertPool(
        config.base_model,
        config.experts,
        device=_rank_device(config.device),
        dtype=config.dtype,
        storage=config.storage,
    )
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    eval_set = build_eval_set(
        tokenizer, max_length=config.eval.max_length, **load_eval_columns(config.eval)
    )
    return sweep_pool(
        pool,
        eval_set,
        methods=config.methods,
        ks=config.k,
        sampling=config.sampling,
        output=config.output,
        batch_size=config.eval.batch_size,
        N=config.N,
        progress=progress,
    )


def sweep_pool(
    pool: ExpertPool,
    eval_set: EvalSet,
    *,
    methods: Sequence[MethodSpec],
    ks: Sequence[int],
    sampling: SamplingConfig,
    output: str | Path,
    batch_size: int = 8,
    N: float | None = None,
    progress: bool = True,
) -> SweepSummary:
    """Sweep an already loaded pool; the model ends with the base weights restored."""
    state = _process_state(pool.device.type)
    output = Path(output)
    jobs = plan_jobs(methods, ks, pool.names, sampling)
    # Every rank must split the same job list: all read what is done before any writes more.
    state.wait_for_everyone()
    done = {record_key(r) for path in _result_files(output) for r in RecordStore(path)}
    todo = [job for job in jobs if job.key not in done]
    state.wait_for_everyone()
    results = RecordStore(_rank_file(output, state) if state.num_processes > 1 else output)
    size = N if N is not None else pool.num_parameters_billions
    written = 0
    with state.split_between_processes(todo) as mine:
        bar = tqdm(
            mine, desc="merge + eval", unit="model", disable=not progress, dynamic_ncols=True
        )
        for job in bar:
            start = time.perf_counter()
            pool.merge(job.method, job.subset)
            merged = time.perf_counter()
            measured = cross_entropy(
                pool.model, eval_set, batch_size=batch_size, device=pool.device
            )
            timing = {"merge_s": merged - start, "eval_s": time.perf_counter() - merged}
            results.append(
                make_record(
                    label=job.method.label,
                    method_name=job.method.name,
                    params=job.method.params,
                    subset=job.subset,
                    measured=measured,
                    N=size,
                    seed=sampling.seed,
                    timing=timing,
                )
            )
            written += 1
            bar.set_postfix(k=job.k, ce=f"{measured.cross_entropy:.4f}")
    pool.restore_base()
    if state.num_processes > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            _gather_rank_files(output)
        state.wait_for_everyone()
    return SweepSummary(output, planned=len(jobs), written=written, skipped=len(jobs) - len(todo))


def _rank_device(device: str) -> str:
    """Under accelerate/torchrun with device auto, each rank merges on its own GPU."""
    if device != "auto":
        return device
    state = _process_state("cuda" if torch.cuda.is_available() else "cpu")
    return str(state.device) if state.num_processes > 1 else device


def _process_state(device_type: str) -> Any:
    """accelerate's view of the launch; on CPU it joins a torchrun world only when told so."""
    from accelerate import PartialState

    return PartialState(cpu=device_type == "cpu")


def _rank_file(output: Path, state: Any) -> Path:
    return output.with_name(f"{output.stem}.rank-{state.process_index}{output.suffix}")


def _result_files(output: Path) -> list[Path]:
    return [output, *sorted(output.parent.glob(f"{output.stem}.rank-*{output.suffix}"))]


def _gather_rank_files(output: Path) -> None:
    """Append every rank's records to the output once, then remove the rank files."""
    results = RecordStore(output)
    done = {record_key(r) for r in results}
    for path in _result_files(output)[1:]:
        for record in RecordStore(path):
            if record_key(record) not in done:
                results.append(record)
                done.add(record_key(record))
        path.unlink()
