"""The k-sweep: merge many subsets of k experts in memory, measure cross-entropy, record each.

The paper wrote every merged model to disk and evaluated it in a separate job. Here the experts are
loaded once (`ExpertPool`), every subset is merged by the fused kernels into one reusable model,
evaluated at once on pre-tokenized data, and appended as one JSON line. A re-run skips what is
already recorded, so an interrupted sweep resumes where it stopped.

Several GPUs or nodes share a sweep under `accelerate launch` or `torchrun`: accelerate's
`PartialState.split_between_processes` gives each rank its share of the jobs, each rank appends to
its own file, and the main process gathers them into the output at the end.

An adaptive sweep (``sampling.strategy`` "adaptive") plans in rounds instead: each method merges a
small balanced design, then what the pool model fitted to its records says settles the answer
(:mod:`hf_mergelaw.adaptive`). Each round is computed from the records on disk, by every rank
alike after a barrier, then split one pick per rank; so it resumes like any sweep.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .adaptive import Round, check_adaptive, check_prior, has_prior, next_round, prior_features
from .cross_entropy import EvalSet, build_eval_set, cross_entropy, fit_max_length
from .errors import SweepConfigError
from .eval_data import load_eval_columns
from .experts import ExpertPool
from .files import read_json
from .pool_model import EffectPrior
from .pool_model.prior import priors_path, store_prior, stored_prior
from .priors import adaptive_prior
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
    """``planned``: the sweep's merges (an adaptive sweep's once it stopped), ``written`` by this
    process, ``skipped`` already recorded; ``stopped``: why each method of an adaptive sweep
    stopped, by label."""

    output: Path
    planned: int
    written: int
    skipped: int
    moved_aside: Path | None = None  # where restart put the old records
    stopped: dict[str, str] = field(default_factory=dict)


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
    check_output(config)
    eval_set = load_eval_set(config)
    pool = load_pool(config)
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


def check_output(config: SweepConfig) -> None:
    """Refuse an output that is not a sweep's records file, or one another sweep is writing,
    before anything slow runs. Only the launch's first process checks: under torchrun or
    accelerate every rank runs this at once, and the ranks of one sweep would find each other
    holding the lock. (The launcher's RANK, not accelerate's state: nothing is initialised yet.)"""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    with RecordStore(config.output).exclusive():
        pass


def load_eval_set(config: SweepConfig) -> EvalSet:
    """The YAML's eval data, tokenised for the base (truncated to its context)."""
    columns = load_eval_columns(config.eval)
    tokenizer = _load_tokenizer(config.eval.tokenizer or config.base_model)
    base_config = read_json(Path(config.base_model) / "config.json", "base model config")
    max_length = fit_max_length(config.eval.max_length, base_config)
    return build_eval_set(tokenizer, max_length=max_length, **columns)


def load_pool(config: SweepConfig) -> ExpertPool:
    """The YAML's base and experts, on this rank's device."""
    return ExpertPool(
        config.base_model,
        config.experts,
        device=_rank_device(config.device),
        dtype=config.dtype,
        storage=config.storage,
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

    With ``sampling.strategy`` "adaptive" each method merges a small balanced design, then in
    rounds what the pool model fitted to its records says settles the answer, until
    ``sampling.budget`` merges or the answer is settled (:mod:`hf_mergelaw.adaptive`);
    ``SweepSummary.stopped`` says why each method stopped.
    """
    ks = list(ks)
    if sampling.adaptive:
        check_prior(sampling.prior)
        check_adaptive(
            len(pool.names), ks, sampling.budget, prior_features(sampling.prior, methods)
        )
    jobs = [] if sampling.adaptive else plan_jobs(methods, ks, pool.names, sampling)
    options = _Options(Path(output), batch_size, N, sampling.seed, progress, restart)
    with _session(pool, eval_set, methods, options) as recorder:
        if sampling.adaptive:
            summary = _sweep_adaptively(recorder, methods, ks, sampling)
        else:
            summary = _sweep_jobs(recorder, jobs)
    return replace(summary, moved_aside=recorder.moved_aside)


def sweep_jobs(
    pool: ExpertPool,
    eval_set: EvalSet,
    jobs: Sequence[Job],
    *,
    output: str | Path,
    batch_size: int = 8,
    N: float | None = None,
    seed: int = 0,
    progress: bool = True,
    restart: bool = False,
) -> SweepSummary:
    """Merge and record the ``jobs`` not yet in ``output`` as a sweep does once it has chosen its
    subsets (provenance checked, the output locked, ranks sharing the work): for subsets chosen
    elsewhere, e.g. held-out merges that check a pool model. ``seed`` goes into the records."""
    methods = list({job.method.label: job.method for job in jobs}.values())
    options = _Options(Path(output), batch_size, N, seed, progress, restart)
    with _session(pool, eval_set, methods, options) as recorder:
        summary = _sweep_jobs(recorder, jobs)
    return replace(summary, moved_aside=recorder.moved_aside)


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


@dataclass(frozen=True)
class _Options:
    output: Path
    batch_size: int
    N: float | None
    seed: int
    progress: bool
    restart: bool


class _Recorder:
    """One sweep's records as one rank sees them: what every rank has recorded so far, and how
    this rank merges, evaluates and appends its share of a list of jobs."""

    def __init__(
        self,
        pool: ExpertPool,
        eval_set: EvalSet,
        state: Any,
        options: _Options,
        N: float,
        moved_aside: Path | None,
    ) -> None:
        self.pool, self.eval_set, self.state, self.options = pool, eval_set, state, options
        self.output, self.N, self.moved_aside = options.output, N, moved_aside
        multi = state.num_processes > 1
        self.results = RecordStore(_rank_file(self.output, state) if multi else self.output)
        self.bar = tqdm(
            total=0,
            desc="merge + eval",
            unit="model",
            disable=not options.progress,
            dynamic_ncols=True,
        )

    def synchronized_records(self) -> list[dict[str, Any]]:
        """Every rank's records (the output and the rank files), read once every rank has
        appended its last merge and by every rank before any appends more: all plan alike."""
        self.state.wait_for_everyone()
        records = [r for path in _result_files(self.output) for r in RecordStore(path)]
        self.state.wait_for_everyone()
        return records

    def measure(self, jobs: Sequence[Job]) -> int:
        """Merge and evaluate this rank's share of ``jobs``, one record each; the count written."""
        written = 0
        with self.state.split_between_processes(list(jobs)) as mine:
            self.bar.total += len(mine)
            self.bar.refresh()
            for job in mine:
                self.results.append(self._record(job))
                written += 1
                self.bar.update()
        return written

    def _record(self, job: Job) -> dict[str, Any]:
        start = time.perf_counter()
        self.pool.merge(job.method, job.subset)
        merged = time.perf_counter()
        measured = cross_entropy(
            self.pool.model, self.eval_set, batch_size=self.options.batch_size,
            device=self.pool.device,
        )  # fmt: skip
        self.bar.set_postfix(k=job.k, ce=f"{measured.cross_entropy:.4f}")
        return make_record(
            label=job.method.label,
            method_name=job.method.name,
            params=job.method.params,
            subset=job.subset,
            measured=measured,
            N=self.N,
            seed=self.options.seed,
            timing={"merge_s": merged - start, "eval_s": time.perf_counter() - merged},
        )

    def finish(self) -> None:
        """Restore the base weights and gather the rank files into the output."""
        self.bar.close()
        self.pool.restore_base()
        if self.state.num_processes > 1:
            self.state.wait_for_everyone()
            if self.state.is_main_process:
                _gather_rank_files(self.output)
            self.state.wait_for_everyone()


@contextlib.contextmanager
def _session(
    pool: ExpertPool, eval_set: EvalSet, methods: Sequence[MethodSpec], options: _Options
) -> Iterator[_Recorder]:
    """Hold the output for one sweep: move old records aside on restart, check and record the
    provenance and lock the file (main process); gather the ranks' records at the end."""
    state = _process_state(pool.device.type)
    size = options.N if options.N is not None else pool.num_parameters_billions
    provenance = pool_provenance(pool, eval_set, size)
    output = options.output
    moved = _move_aside(output) if options.restart and state.is_main_process else None
    state.wait_for_everyone()
    store = RecordStore(output)
    with store.exclusive() if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            _claim(store, provenance, methods)
        recorder = _Recorder(pool, eval_set, state, options, size, moved)
        yield recorder
        recorder.finish()


def _sweep_jobs(recorder: _Recorder, jobs: Sequence[Job]) -> SweepSummary:
    # Every rank must split the same job list: all read what is done before any writes more.
    done = {record_key(r) for r in recorder.synchronized_records()}
    todo = [job for job in jobs if job.key not in done]
    written = recorder.measure(todo)
    return SweepSummary(
        recorder.output, planned=len(jobs), written=written, skipped=len(jobs) - len(todo)
    )


def _sweep_adaptively(
    recorder: _Recorder,
    methods: Sequence[MethodSpec],
    ks: Sequence[int],
    sampling: SamplingConfig,
) -> SweepSummary:
    """Each method in turn: rounds of :func:`~hf_mergelaw.adaptive.next_round`, one pick per
    rank, until it stops; every rank computes the same round from the same records."""
    planned = skipped = written = 0
    stopped = {}
    for method in methods:
        prior = _method_prior(recorder, method, sampling.prior)
        step = _round(recorder, method, ks, sampling, prior)
        skipped += step.merged
        while step.stop is None:
            written += recorder.measure([Job(method, len(s), s) for s in step.picks])
            step = _round(recorder, method, ks, sampling, prior)
        planned += step.merged
        stopped[method.label] = step.stop
    return SweepSummary(
        recorder.output, planned=planned, written=written, skipped=skipped, stopped=stopped
    )


def _method_prior(recorder: _Recorder, method: MethodSpec, kind: str) -> EffectPrior | None:
    """The method's prior, computed once by the main process and kept beside the records, so
    every rank and every resumed run fits with the same numbers (a curvature computed on each
    GPU need not agree to the last bit, and the picks follow every bit)."""
    if not has_prior(kind, method):
        return None
    experts = sorted(recorder.pool.names)
    if recorder.state.is_main_process and not stored_prior(
        recorder.output, method.label, kind, experts
    ):
        prior = adaptive_prior(
            recorder.pool,
            method,
            kind,
            recorder.eval_set,
            batch_size=recorder.options.batch_size,
        )
        store_prior(recorder.output, method.label, prior)
    recorder.state.wait_for_everyone()
    return stored_prior(recorder.output, method.label, kind, experts)


def _round(
    recorder: _Recorder,
    method: MethodSpec,
    ks: Sequence[int],
    sampling: SamplingConfig,
    prior: EffectPrior | None,
) -> Round:
    return next_round(
        recorder.synchronized_records(),
        method=method.label,
        experts=recorder.pool.names,
        ks=ks,
        budget=sampling.budget,
        count=recorder.state.num_processes,
        seed=sampling.seed,
        prior=prior,
    )


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
    """Rename the records (and their provenance and priors) to
    ``<stem>.replaced-<time><suffix>``."""
    if not output.exists():
        return None
    RecordStore(output).check()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output.with_name(f"{output.stem}.replaced-{stamp}{output.suffix}")
    os.replace(output, target)
    for sidecar in (provenance_path, priors_path):
        if sidecar(output).exists():
            os.replace(sidecar(output), sidecar(target))
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
