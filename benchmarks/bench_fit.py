"""Time of a joint-law fit with bootstrap: 10,000 records, 200 resamples (issue target: < 10 s).

The records are a synthetic sweep from the paper's Average/code joint fit and Average/code
variance fit (hf_mergelaw.law.paper): 7 sizes (0.5-72B), k = 1..9, a pool of 20 experts, up to 180
subsets per (N, k) cell with independent scatter, then 10,000 records drawn without replacement.
Each repeat runs the whole `hf-mergelaw fit` path: read the JSON-lines file, validate, aggregate,
multi-start fit, 200 subset-resampling refits, and the companion variance-law fit.

Run from the repository root:
  python benchmarks/bench_fit.py --machine "2-core CPU CI machine"
writes benchmarks/results/fit_cpu_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy
from results_io import save_results

from hf_mergelaw.law import fit_sweep, load_records
from hf_mergelaw.law.paper import joint_fits, variance_fits
from hf_mergelaw.law.synthetic import joint_mean, synthetic_sweep

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 10.0


def build_records(n_records: int, seed: int) -> list[dict]:
    mean = joint_fits()[("average", "code")]
    var = variance_fits()[("average", "code")]
    rows = synthetic_sweep(mean, var, pool_size=20, subsets=180, scatter="independent", seed=seed)
    if len(rows) < n_records:
        raise SystemExit(f"the synthetic sweep has only {len(rows)} records")
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), n_records, replace=False))
    return [rows[i] for i in keep]


def time_fit(path: Path, bootstrap: int) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    report = fit_sweep(load_records(path), "joint", bootstrap=bootstrap, seed=0)
    return time.perf_counter() - wall, time.process_time() - cpu, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    rows = build_records(args.records, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        time_fit(path, 5)  # warm-up: imports, caches
        runs = [time_fit(path, args.bootstrap) for _ in range(args.repeats)]
    walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
    fit = runs[-1][2].fits[0]
    ks = np.arange(1, 10)
    truth = joint_mean(joint_fits()[("average", "code")], 72.0, ks)
    pred = fit.predict(72.0, ks)
    result = {
        "benchmark": "bench_fit",
        "machine": args.machine,
        "date": args.date,
        "command": shlex.join(["python", "benchmarks/bench_fit.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "records": fit.n_points,
        "cells": fit.n_cells,
        "bootstrap": args.bootstrap,
        "bootstrap_failed": fit.bootstrap.n_failed,
        "repeats": args.repeats,
        "wall_seconds_median": statistics.median(walls),
        "wall_seconds_max": max(walls),
        "cpu_seconds_median": statistics.median(cpus),
        "target_seconds": TARGET_SECONDS,
        "meets_target": max(walls) < TARGET_SECONDS,
        "r2": fit.r2,
        "max_rel_error_72B": float(np.max(np.abs(pred.mean / truth - 1))),
        "ci_covers_truth_72B": int(np.sum((pred.lo <= truth) & (truth <= pred.hi))),
    }
    table = [
        f"# bench_fit: {result['records']} records, {args.bootstrap} bootstrap resamples",
        "",
        f"Machine: {args.machine}. Date: {args.date}. Python {result['python']}, "
        f"numpy {result['numpy']}, scipy {result['scipy']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| records | cells | resamples | failed | wall median (s) | wall max (s) | CPU median (s) "
        "| target | met |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['records']} | {result['cells']} | {args.bootstrap} | "
        f"{result['bootstrap_failed']} | {result['wall_seconds_median']:.2f} | "
        f"{result['wall_seconds_max']:.2f} | {result['cpu_seconds_median']:.2f} | "
        f"< {TARGET_SECONDS:g} s | {'yes' if result['meets_target'] else 'no'} |",
        "",
        f"Fit: R^2 {result['r2']:.4f}; at 72B the mean is within "
        f"{result['max_rel_error_72B']:.2%} of the true curve and the 90% interval covers it at "
        f"{result['ci_covers_truth_72B']} of 9 k values.",
    ]
    save_results(args.out_dir, f"fit_cpu_{args.date}", result, "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
