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

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .cross_entropy import EvalSet, build_eval_set, cross_entropy, fit_max_length
from .errors import SweepConfigError
from .eval_data import load_eval_columns
from .experts import ExpertPool
from .files import read_json
from .provenance import (
    Provenance,
    eval_identity,
    project_version,
    provenance_path,
    read_provenance,
    write_provenance,
)
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
    moved_aside: Path | None = None  # where restart put the old records


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


def run_sweep(config: SweepConfig, *, progress: bool = True, restart: bool = False) -> SweepSummary:
    """Run the sweep a YAML describes (see `sweep_config`).

    What is cheap to check is checked before any model loads: the output (a sweep's own records
    file, writable, not in use by another sweep), then the eval data and the tokenizer.
    """
    with RecordStore(config.output).exclusive():
        pass
    columns = load_eval_columns(config.eval)
    tokenizer = _load_tokenizer(config.eval.tokenizer or config.base_model)
    base_config = read_json(Path(config.base_model) / "config.json", "base model config")
    max_length = fit_max_length(config.eval.max_length, base_config)
    eval_set = build_eval_set(tokenizer, max_length=max_length, **columns)
    pool = ExpertPool(
        config.base_model,
        config.experts,
        device=_rank_device(config.device),
        dtype=config.dtype,
        storage=config.storage,
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
        restart=restart,
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
    restart: bool = False,
) -> SweepSummary:
    """Sweep an already loaded pool; the model ends with the base weights restored.

    Records already in ``output`` are reused only if they were measured with this configuration
    (:mod:`hf_mergelaw.provenance`); otherwise this stops, naming what changed. ``restart`` moves
    the old records aside (``<name>.replaced-<time>.jsonl``) and starts over.
    """
    state = _process_state(pool.device.type)
    output = Path(output)
    size = N if N is not None else pool.num_parameters_billions
    provenance = pool_provenance(pool, eval_set, size)
    jobs = plan_jobs(methods, ks, pool.names, sampling)
    moved = None
    if state.is_main_process:
        moved = _move_aside(output) if restart else None
    state.wait_for_everyone()
    store = RecordStore(output)
    with store.exclusive() if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            _claim(store, provenance, methods)
        # Every rank must split the same job list: all read what is done before any writes more.
        state.wait_for_everyone()
        done = {record_key(r) for path in _result_files(output) for r in RecordStore(path)}
        todo = [job for job in jobs if job.key not in done]
        state.wait_for_everyone()
        results = RecordStore(_rank_file(output, state)) if state.num_processes > 1 else store
        written = _measure(pool, eval_set, todo, results, state, batch_size, size, sampling.seed,
                           progress)  # fmt: skip
        if state.num_processes > 1:
            state.wait_for_everyone()
            if state.is_main_process:
                _gather_rank_files(output)
            state.wait_for_everyone()
    return SweepSummary(
        output,
        planned=len(jobs),
        written=written,
        skipped=len(jobs) - len(todo),
        moved_aside=moved,
    )


def pool_provenance(pool: ExpertPool, eval_set: EvalSet, N: float) -> Provenance:
    return Provenance(
        base=pool.base_identity,
        eval=eval_identity([*eval_set.input_ids, *eval_set.labels], eval_set.domains),
        dtype=str(pool.dtype).removeprefix("torch."),
        device=pool.device.type,
        N=N,
        version=project_version(),
        experts=pool.identities,
    )


def _measure(
    pool: ExpertPool,
    eval_set: EvalSet,
    jobs: Sequence[Job],
    results: RecordStore,
    state: Any,
    batch_size: int,
    N: float,
    seed: int,
    progress: bool,
) -> int:
    """Merge and evaluate this rank's share of ``jobs``, one record each; the count written."""
    written = 0
    with state.split_between_processes(list(jobs)) as mine:
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
                    N=N,
                    seed=seed,
                    timing=timing,
                )
            )
            written += 1
            bar.set_postfix(k=job.k, ce=f"{measured.cross_entropy:.4f}")
    pool.restore_base()
    return written


def _claim(store: RecordStore, provenance: Provenance, methods: Sequence[MethodSpec]) -> None:
    """Check that the records already in ``store`` were measured like this sweep will measure,
    then record this sweep's provenance (joined with theirs: a pool may grow)."""
    records = list(store)
    old = read_provenance(store.path)
    way_out = (
        "Write this sweep to a new output, or start over with --restart (restart=True), which "
        "moves the old records aside."
    )
    if records and old is None:
        raise SweepConfigError(
            f"{store.path} holds {len(records)} records but no {provenance_path(store.path).name}"
            " saying what they were measured with (an older version wrote them, or the file was "
            f"copied without it), so they cannot be resumed safely. {way_out}"
        )
    changes = [] if old is None else provenance.changes_from(old)
    params = {r["method"]: r["params"] for r in records}
    changes += [
        f"the parameters of method {m.label!r} ({params[m.label]} -> {dict(m.params)})"
        for m in methods
        if m.label in params and params[m.label] != dict(m.params)
    ]
    if changes:
        raise SweepConfigError(
            f"{store.path} holds records measured with another configuration: "
            f"{'; '.join(changes)}. {way_out}"
        )
    write_provenance(store.path, provenance if old is None else provenance.joined(old))


def _move_aside(output: Path) -> Path | None:
    """Rename the records (and their provenance) to ``<stem>.replaced-<time><suffix>``."""
    if not output.exists():
        return None
    RecordStore(output).check()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output.with_name(f"{output.stem}.replaced-{stamp}{output.suffix}")
    os.replace(output, target)
    if provenance_path(output).exists():
        os.replace(provenance_path(output), provenance_path(target))
    return target


def _load_tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise SweepConfigError(
            f"no tokenizer could be loaded from {source} ({error}); set eval.tokenizer to a "
            "folder holding the tokenizer files the experts were trained with."
        ) from None


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
