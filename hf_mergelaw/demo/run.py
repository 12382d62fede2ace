"""The demo end to end: build or load the pool, sweep k, fit the law, plan, draw, report.

    from hf_mergelaw.demo import run_demo
    result = run_demo(Path("demo-out"))               # ~4 min from nothing on 2 CPU cores
    print(result.summary)                             # fit table, plan, science verdict
    result.report, result.check.passed, result.plans["average"].k90

Everything lands in the output folder: ``records.jsonl`` (the balanced sweep, appended per merge,
so an interrupted run resumes), ``held_out.jsonl`` (merges kept out of every fit, to check the
pool model), ``fit.json``, ``plan.json``, ``science.json``, ``pool.json`` (the pool model of every
method and domain: ``hf-mergelaw pool predict/select`` read it), ``pool_check.json``,
``geometry.json`` (each method's pool model from the loss's curvature at the base, with no merge:
the same reader) and ``geometry_check.json`` (it against the merges), the PNG figures (the pool
model's in ``pool/``) and ``report.md``, each written atomically, the report last. ``run.json``
pins the settings the records were measured with; a folder holding another size's records is
refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from hf_mergelaw.cross_entropy import CrossEntropy, EvalSet, build_eval_set, cross_entropy
from hf_mergelaw.errors import DemoError
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.files import read_json, write_atomic, write_json
from hf_mergelaw.geometry import method_models
from hf_mergelaw.law import FitReport, Plan, fit_sweep, plan
from hf_mergelaw.pool_model import PoolReport, fit_pools
from hf_mergelaw.record_schema import CROSS_DOMAIN, records_by_domain
from hf_mergelaw.record_store import RecordStore
from hf_mergelaw.sweep import Job, SweepSummary, sweep_jobs, sweep_pool
from hf_mergelaw.sweep_config import SamplingConfig
from hf_mergelaw.sweep_methods import MethodSpec

from .corpus import DOMAINS, Corpus, eval_chunks, load_corpus
from .figures import draw_figures, draw_geometry_figure, draw_pool_figures
from .geometry_check import GeometryCheck, check_geometry
from .pool import DemoPool, build_or_load_pool, default_cache_dir
from .pool_check import PoolCheck, check_pools, held_out_subsets
from .report import ReportInputs, console_summary, render_report
from .science import ScienceCheck, check_science
from .settings import DEFAULT_MIN_GAIN, FULL, QUICK, TARGET_ABOVE_FLOOR, DemoSettings


@dataclass(frozen=True)
class DemoResult:
    """Where everything went, and the headline numbers."""

    output_dir: Path
    records: Path
    held_out: Path
    fit: Path
    plan: Path
    science: Path
    pool_model: Path
    pool_check: Path
    geometry: Path
    report: Path
    figures: dict[str, Path]
    pool: DemoPool
    check: ScienceCheck
    answers: PoolCheck
    geometry_check: GeometryCheck
    plans: dict[str, Plan]
    records_written: int
    records_skipped: int
    held_out_written: int
    timings: dict[str, float]
    threads: int
    summary: str  # the fit table, the plans and the science verdict, as the CLI prints them


def run_demo(
    output_dir: Path,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    threads: int | None = None,
    target_loss: float | None = None,
    min_gain: float = DEFAULT_MIN_GAIN,
    subsets: int | Literal["all"] | None = None,
) -> DemoResult:
    """Run the demo into ``output_dir``.

    Args:
        quick: the reduced size (CI, under a minute): 6 domains, a tiny model, few subsets.
        cache_dir: where pools are cached (default ``~/.cache/hf-mergelaw/demo``).
        progress: show progress bars.
        threads: torch CPU threads (default: the cores the load average leaves idle, at least
            one; a tiny model on busy cores runs several times slower with more threads).
        target_loss: the plan's target cross-domain CE (default: 1% above each fitted floor).
        min_gain: the stop rule's smallest worthwhile gain per added expert, nats.
        subsets: subsets merged per k: a count, drawn with every expert in equally many
            (default 8; 6 when quick), or "all" (every subset: 255 per method at full size,
            about 4x the sweep's time).
    """
    start = time.perf_counter()
    settings = (QUICK if quick else FULL).with_subsets(subsets)
    output_dir = Path(output_dir)
    _claim_output(output_dir, settings)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    load_average = os.getloadavg()[0]
    threads = idle_cores(load_average) if threads is None else threads
    timings: dict[str, float] = {}
    records_path = output_dir / "records.jsonl"
    held_out_path = output_dir / "held_out.jsonl"
    with _torch_threads(threads), _quiet_transformers():
        corpus = demo_corpus(settings)
        pool_files = build_or_load_pool(settings.pool, corpus, cache_dir, progress=progress)
        timings["pool (built)" if pool_files.built else "pool (cached)"] = _lap(start)
        measured = measure(
            pool_files, corpus, settings, records_path, held_out_path, progress=progress
        )
        summary, base = measured.sweep, measured.base
        timings["sweep (and held-out merges)"] = _lap(start, timings)

    stages = tqdm(
        total=4, desc="fit, plan, pool model, figures", disable=not progress, dynamic_ncols=True
    )
    records = list(RecordStore(records_path))
    rows = records_by_domain(records)
    fits = fit_sweep(
        rows,
        form="per-size",
        by=("method", "domain"),
        bootstrap=settings.sweep.bootstrap,
        seed=settings.sweep.seed,
    )
    stages.update()
    plans = demo_plans(fits, len(corpus.names), target_loss, min_gain)
    check = check_science(rows, fits)
    paths = {name: output_dir / f"{name}.json" for name in ("fit", "plan", "science")}
    fits.save(paths["fit"])
    write_json(paths["plan"], {m: p.to_dict() for m, p in plans.items()})
    write_json(paths["science"], check.to_dict())
    stages.update()
    timings["fit + plan"] = _lap(start, timings)
    pool_report = fit_pools(records, by=("method", "domain"), experts=corpus.names)
    answers = check_pools(pool_report, list(RecordStore(held_out_path)), seed=settings.sweep.seed)
    paths |= {"pool": output_dir / "pool.json", "pool_check": output_dir / "pool_check.json"}
    pool_report.save(paths["pool"])
    write_json(paths["pool_check"], answers.to_dict())
    measured_merges = records + list(RecordStore(held_out_path))
    geometry = check_geometry(measured.geometry, measured_merges, fits, measured.geometry_s)
    paths |= {"geometry": output_dir / "geometry.json"}
    measured.geometry.save(paths["geometry"])
    write_json(output_dir / "geometry_check.json", geometry.to_dict())
    stages.update()
    timings["pool model"] = _lap(start, timings)
    figures = draw_figures(
        rows, fits, check, output_dir, num_parameters=pool_files.manifest["num_parameters"]
    )
    figures |= draw_pool_figures(answers, output_dir)
    figures |= draw_geometry_figure(geometry, output_dir)
    stages.update()
    stages.close()
    timings["figures"] = _lap(start, timings)
    timings["total"] = time.perf_counter() - start

    inputs = ReportInputs(
        settings=settings,
        manifest=pool_files.manifest,
        pool_built=pool_files.built,
        pool_dir=str(pool_files.root),
        base_ce={CROSS_DOMAIN: base.macro_cross_entropy}
        | {d: v.cross_entropy for d, v in base.per_domain.items()},
        own_domain_ce=own_domain_ce(rows),
        fits=fits,
        plans=plans,
        default_target=target_loss is None,
        check=check,
        answers=answers,
        geometry=geometry,
        n_records=summary.planned,
        figures={name: str(path.relative_to(output_dir)) for name, path in figures.items()},
        timings=timings,
        threads=threads,
        load_average=load_average,
    )
    report_path = output_dir / "report.md"
    write_atomic(report_path, render_report(inputs))
    return DemoResult(
        output_dir=output_dir,
        records=records_path,
        held_out=held_out_path,
        fit=paths["fit"],
        plan=paths["plan"],
        science=paths["science"],
        pool_model=paths["pool"],
        pool_check=paths["pool_check"],
        geometry=paths["geometry"],
        report=report_path,
        figures=figures,
        pool=pool_files,
        check=check,
        answers=answers,
        geometry_check=geometry,
        plans=plans,
        records_written=summary.written,
        records_skipped=summary.skipped,
        held_out_written=measured.held_out.written,
        timings=timings,
        threads=threads,
        summary=console_summary(inputs) + f"\n\nreport: {report_path}",
    )


@dataclass(frozen=True)
class Measured:
    sweep: SweepSummary
    held_out: SweepSummary
    base: CrossEntropy  # the base model alone
    geometry: PoolReport  # each method's pool model from curvature at the base, no merge
    geometry_s: float


def measure(
    pool_files: DemoPool,
    corpus: Corpus,
    settings: DemoSettings,
    records_path: Path,
    held_out_path: Path,
    *,
    progress: bool = True,
) -> Measured:
    """Sweep the pool into ``records_path``, merge the held-out subsets into ``held_out_path``
    (each resuming what is there), score the base alone and take each method's geometry."""
    pool = ExpertPool(pool_files.base_dir, pool_files.experts, device="cpu", dtype=torch.float32)
    eval_set = demo_eval_set(pool_files.base_dir, corpus, settings)
    sweep, methods, names = settings.sweep, demo_methods(settings), pool.names
    summary = sweep_pool(
        pool,
        eval_set,
        methods=methods,
        ks=range(1, len(names) + 1),
        sampling=SamplingConfig(strategy=sweep.strategy, per_k=sweep.per_k, seed=sweep.seed),
        output=records_path,
        batch_size=sweep.eval_batch_size,
        progress=progress,
    )
    subsets = [tuple(names[i] for i in s) for s in held_out_subsets(len(names), sweep)]
    held_out = SweepSummary(held_out_path, planned=0, written=0, skipped=0)
    if subsets:  # none when the sweep merged every subset
        held_out = sweep_jobs(
            pool,
            eval_set,
            [Job(method, len(subset), subset) for method in methods for subset in subsets],
            output=held_out_path,
            batch_size=sweep.eval_batch_size,
            seed=sweep.seed,
            progress=progress,
        )
    # Sweeps leave the base weights in the model.
    base = cross_entropy(pool.model, eval_set, batch_size=sweep.eval_batch_size)
    start = time.perf_counter()
    priors = [
        model
        for method in methods
        for model in method_models(pool, eval_set, method, "hessian", sweep.eval_batch_size, 0.9)
    ]
    geometry_s = time.perf_counter() - start
    return Measured(summary, held_out, base, PoolReport(priors, ("method", "domain")), geometry_s)


def demo_corpus(settings: DemoSettings) -> Corpus:
    domains = [d for d in DOMAINS if d.name in settings.pool.domains]
    return load_corpus(
        domains,
        max_train_chars=settings.pool.max_train_chars,
        max_held_out_chars=settings.pool.max_held_out_chars,
        held_out_fraction=settings.pool.held_out_fraction,
    )


def demo_eval_set(tokenizer_dir: Path, corpus: Corpus, settings: DemoSettings) -> EvalSet:
    """``eval_sequences`` held-out pieces per domain, each cut to the training length."""
    texts, domains = [], []
    for domain in corpus.domains:
        pieces = eval_chunks(
            domain.held_out, settings.sweep.eval_sequences, settings.sweep.eval_chars
        )
        texts += pieces
        domains += [domain.name] * len(pieces)
    return build_eval_set(
        tokenizer_dir, texts=texts, domains=domains, max_length=settings.pool.seq_len
    )


def demo_methods(settings: DemoSettings) -> list[MethodSpec]:
    """Average and fused TIES (mergekit's ``ties_fused``: the same math as ``ties`` here)."""
    ties = {
        "name": "ties",
        "label": "ties_fused",
        "density": settings.sweep.ties_density,
        "lambda": 1.0,
    }
    return [MethodSpec.from_config({"name": "average"}), MethodSpec.from_config(ties)]


def demo_plans(
    fits: FitReport, num_experts: int, target_loss: float | None, min_gain: float
) -> dict[str, Plan]:
    """One cross-domain plan per method (target default: 1% above that method's floor)."""
    plans = {}
    for fit in fits.select({"domain": CROSS_DOMAIN}):
        target = (
            fit.params["L_inf"] * (1 + TARGET_ABOVE_FLOOR) if target_loss is None else target_loss
        )
        plans[fit.group["method"]] = plan(
            fit, target_loss=target, min_gain=min_gain, k_max=num_experts
        )[0]
    return plans


def own_domain_ce(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each domain's CE under its own expert alone (k = 1, method average)."""
    return {
        row["domain"]: row["ce"]
        for row in rows
        if row["k"] == 1 and row["method"] == "average" and row["subset"] == [row["domain"]]
    }


def idle_cores(load_average: float) -> int:
    """CPU cores the 1-minute load average leaves idle, at least one."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - load_average)))


def _claim_output(output_dir: Path, settings: DemoSettings) -> None:
    """Pin the output folder to these settings: records measured otherwise must not mix in."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = output_dir / "run.json"
    wanted = {"settings": settings.describe(), "fingerprint": settings.fingerprint()}
    if stamp.exists():
        found = read_json(stamp, "demo stamp")
        if found.get("fingerprint") != wanted["fingerprint"]:
            raise DemoError(
                f"{output_dir} holds records of a demo run with other settings "
                f"({found.get('settings')}; this run: {settings.describe()}); "
                "use another output folder or remove that one."
            )
        return
    if (output_dir / "records.jsonl").exists():
        raise DemoError(
            f"{output_dir} holds a records.jsonl that no demo run wrote; use another output folder."
        )
    write_json(stamp, {**wanted, "pool": asdict(settings.pool), "sweep": asdict(settings.sweep)})


def _lap(start: float, timings: dict[str, float] | None = None) -> float:
    """Seconds since ``start`` not yet booked in ``timings``."""
    return time.perf_counter() - start - sum((timings or {}).values())


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-file load/save bars: the demo saves and loads a dozen models and
    has bars of its own."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
