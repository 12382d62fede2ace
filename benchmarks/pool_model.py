"""The pool model's targets: accuracy on the demo pool against every subset merged, and speed.

Accuracy. Input: the records of a sweep that merged every subset (`hf-mergelaw demo --subsets
all`), so each held-out subset's CE is measured. For each seed, a balanced design of `--per-k`
subsets per k (hf_mergelaw.subsets.sample_subsets, strategy "balanced") is drawn from those
records, the pool model is fitted on it (f(k) free), and every subset it did not fit on is
predicted. Reported per curve (each method's cross-domain "macro" curve and each domain's): R^2
of the within-k deviations, coverage of the `--level` intervals, and for each k = 2..M-1 where
the chosen best subset of that size ranks among the measured CEs of every subset of the size
(the share of subsets strictly better than it; the target is under 5%). Then the law curve:
fitted on the designs' k = 1..`--extrapolate-from` only, scored on every larger subset.

Speed. A synthetic pool of 30 experts (hf_mergelaw.pool_model.synthetic: 3 far-off experts, 20
strongly interacting pairs), 10,000 distinct subsets of uniformly drawn sizes 1..30: `fit_pool`
and `select` (every size and overall, top 1, 1000 draws) timed, each in a fresh process per BLAS
thread setting (the default, and 1 thread).

Run from the repository root:
  hf-mergelaw demo --subsets all -o /tmp/demo-all --no-progress
  python benchmarks/pool_model.py /tmp/demo-all/records.jsonl --machine "2-core CPU"
writes benchmarks/results/pool_model_cpu_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy
from results_io import save_results

from hf_mergelaw.pool_model import (
    PoolModel,
    PoolRecords,
    coverage,
    fit_pool,
    pool_records,
    select,
    synthetic_pool,
    within_k_r2,
)
from hf_mergelaw.subsets import sample_subsets

REPO = Path(__file__).resolve().parents[1]
TOP_SHARE = 0.05  # the chosen best of a size must beat all but this share of its size
TIMING = {"experts": 30, "records": 10_000, "repeats": 3, "draws": 1000, "seed": 0}
TARGET_FIT_S, TARGET_SELECT_S = 10.0, 30.0


def design_mask(group: PoolRecords, per_k: int, seed: int, k_max: int | None = None) -> np.ndarray:
    """Which of the group's records a balanced design of ``per_k`` subsets per k = 1..k_max
    (default: every size) merges."""
    m = len(group.experts)
    index = {subset: i for i, subset in enumerate(group.subsets())}
    mask = np.zeros(len(group), dtype=bool)
    for k in range(1, (k_max or m) + 1):
        for subset in sample_subsets(m, k, strategy="balanced", per_k=per_k, seed=seed):
            mask[index[tuple(group.experts[i] for i in subset)]] = True
    return mask


def restricted(group: PoolRecords, mask: np.ndarray) -> PoolRecords:
    return replace(
        group,
        members=group.members[mask],
        ce=group.ce[mask],
        lines=tuple(np.asarray(group.lines)[mask]),
    )


def score_design(group: PoolRecords, mask: np.ndarray, level: float, draws: int) -> dict:
    return score_model(group, mask, fit_pool(restricted(group, mask), level=level), draws)


def score_model(group: PoolRecords, mask: np.ndarray, model: PoolModel, draws: int) -> dict:
    """Score a model fitted on the records ``mask`` selects on every other subset of the group
    (R^2 within k, interval coverage) and its best subset of each k = 2..M-1 (the share of that
    size's measured CEs strictly below the chosen subset's)."""
    held = ~mask
    prediction = model.predict(group.members[held])
    measured, k = group.ce[held], group.k[held]
    index = {subset: i for i, subset in enumerate(group.subsets())}
    shares = {}
    for chosen in select(model, top=1, draws=draws):
        if chosen.scope != "size" or not 2 <= chosen.k <= model.m - 1:
            continue
        same_size = group.ce[group.k == chosen.k]
        shares[chosen.k] = float(np.mean(same_size < group.ce[index[chosen.subset]]))
    return {
        "records": int(mask.sum()),
        "held_out": int(held.sum()),
        "r2_within_k": within_k_r2(measured, prediction.mean, k),
        "coverage": coverage(measured, prediction.lo, prediction.hi),
        "best_share_by_k": shares,
    }


def accuracy(path: Path, per_k: int, designs: int, level: float, draws: int) -> list[dict]:
    rows = []
    for group in pool_records(path):
        m = len(group.experts)
        if len(group) != 2**m - 1:
            raise SystemExit(
                f"{path}: {group.label()} has {len(group)} of {2**m - 1} subsets; this study "
                "needs a sweep of every subset (hf-mergelaw demo --subsets all)"
            )
        scores = [
            score_design(group, design_mask(group, per_k, s), level, draws) for s in range(designs)
        ]
        shares = [share for s in scores for share in s["best_share_by_k"].values()]
        rows.append(
            {
                **group.group,
                "experts": m,
                "records_per_design": scores[0]["records"],
                "held_out_per_design": scores[0]["held_out"],
                **min_mean_max("r2_within_k", [s["r2_within_k"] for s in scores]),
                **min_mean_max("coverage", [s["coverage"] for s in scores]),
                "best_in_top_share": float(np.mean(np.array(shares) < TOP_SHARE)),
                "best_exact": float(np.mean(np.array(shares) == 0.0)),
                "best_share_worst": float(max(shares)),
                "designs": scores,
            }
        )
    return rows


def extrapolation(path: Path, per_k: int, designs: int, level: float, k_max: int) -> list[dict]:
    """The law curve fitted on k = 1..k_max of each method's macro curve, scored on every subset
    of the larger sizes (all flagged as extrapolated)."""
    rows = []
    for group in pool_records(path):
        if group.group.get("domain") != "macro":
            continue
        far = group.k > k_max
        scores = []
        for seed in range(designs):
            model = fit_pool(
                restricted(group, design_mask(group, per_k, seed, k_max)), curve="law", level=level
            )
            prediction = model.predict(group.members[far])
            measured = group.ce[far]
            scores.append(
                {
                    "b": model.curve.b,
                    "mean_abs_error": float(np.mean(np.abs(prediction.mean - measured))),
                    "r2_within_k": within_k_r2(measured, prediction.mean, group.k[far]),
                    "coverage": coverage(measured, prediction.lo, prediction.hi),
                    "all_flagged": bool(prediction.extrapolated.all()),
                }
            )
        rows.append(
            {
                **group.group,
                "fitted_k": f"1-{k_max}",
                "predicted_k": f"{k_max + 1}-{len(group.experts)}",
                "subsets_predicted": int(far.sum()),
                **min_mean_max("mean_abs_error", [s["mean_abs_error"] for s in scores]),
                **min_mean_max("r2_within_k", [s["r2_within_k"] for s in scores]),
                **min_mean_max("coverage", [s["coverage"] for s in scores]),
                "all_flagged": all(s["all_flagged"] for s in scores),
                "designs": scores,
            }
        )
    return rows


def min_mean_max(name: str, values: list[float]) -> dict[str, float]:
    return {
        f"{name}_mean": float(np.mean(values)),
        f"{name}_min": float(np.min(values)),
        f"{name}_max": float(np.max(values)),
    }


def timing_child() -> None:
    """Time fit and select once per repeat in this process; print JSON."""
    settings = TIMING
    m = settings["experts"]
    pool = synthetic_pool(m, seed=settings["seed"], outliers=3, strong_pairs=20)
    rng = np.random.default_rng(settings["seed"])
    subsets: set[tuple[int, ...]] = set()
    while len(subsets) < settings["records"]:
        k = int(rng.integers(1, m + 1))
        subsets.add(tuple(sorted(rng.choice(m, k, replace=False).tolist())))
    rows = pool.records(sorted(subsets), seed=1)
    fit_s, select_s = [], []
    for _ in range(settings["repeats"]):
        start = time.perf_counter()
        model = fit_pool(pool_records(rows)[0])
        fit_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        chosen = select(model, draws=settings["draws"])
        select_s.append(time.perf_counter() - start)
    methods = sorted({s.method for s in chosen})
    print(json.dumps({"fit_s": fit_s, "select_s": select_s, "select_methods": methods}))


def timing(threads: list[str | None]) -> list[dict]:
    out = []
    for setting in threads:
        env = dict(os.environ)
        if setting is not None:
            env.update(
                OPENBLAS_NUM_THREADS=setting, OMP_NUM_THREADS=setting, MKL_NUM_THREADS=setting
            )
        load = os.getloadavg()[0]
        done = subprocess.run(
            [sys.executable, __file__, "--timing-child"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        out.append(
            {
                "blas_threads": setting or "default",
                "load_average_before": load,
                "fit_s_median": float(np.median(result["fit_s"])),
                "select_s_median": float(np.median(result["select_s"])),
                **result,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, nargs="?")
    parser.add_argument("--per-k", type=int, default=8)
    parser.add_argument("--designs", type=int, default=20, help="seeded designs per curve")
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--draws", type=int, default=1000, help="posterior draws of select")
    parser.add_argument(
        "--extrapolate-from", type=int, default=5, help="largest k the law-curve check fits on"
    )
    parser.add_argument("--machine", default="CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timing_child:
        timing_child()
        return
    if args.records is None:
        parser.error("give the records of a sweep of every subset")
    result = {
        "benchmark": "pool_model",
        "machine": args.machine,
        "date": args.date,
        "command": shlex.join(["python", "benchmarks/pool_model.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "settings": {
            "per_k": args.per_k,
            "designs": args.designs,
            "level": args.level,
            "draws": args.draws,
            "curve": "free",
            "top_share": TOP_SHARE,
            "extrapolate_from": args.extrapolate_from,
            "timing": TIMING,
        },
        "accuracy": accuracy(args.records, args.per_k, args.designs, args.level, args.draws),
        "extrapolation": extrapolation(
            args.records, args.per_k, args.designs, args.level, args.extrapolate_from
        ),
        "timing": timing([None, "1"]),
    }
    save_results(args.out_dir, f"pool_model_cpu_{args.date}", result, render(result))
    print(render(result))


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# pool_model: accuracy on the demo pool and speed",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Command: `{result['command']}`. "
        f"Python {result['python']}, numpy {result['numpy']}, scipy {result['scipy']}.",
        "",
        "## Accuracy: fitted on a balanced design, scored on every other subset",
        "",
        f"Each of {s['designs']} seeded designs draws {s['per_k']} subsets per k "
        "(`sample_subsets(..., strategy='balanced')`; all of a size with fewer) from a sweep "
        "that merged every subset; the pool model (f(k) free, prior scales by marginal "
        f"likelihood) is fitted on them and predicts every subset it did not see. R^2 of the "
        f"within-k deviations; coverage of the {s['level']:.0%} intervals; 'best in top 5%': "
        "the share of (design, k = 2..M-1) where the chosen best subset of size k beats all "
        f"but under 5% of that size's measured CEs (select, top 1, {s['draws']} draws); "
        "'exact' where it is the measured best.",
        "",
        "| method | curve | records | held out | R^2 mean (min..max) | coverage mean (min..max) "
        "| best in top 5% | exact best | worst share above it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["accuracy"]:
        lines.append(
            f"| {r['method']} | {r['domain']} | {r['records_per_design']} | "
            f"{r['held_out_per_design']} | {r['r2_within_k_mean']:.4f} "
            f"({r['r2_within_k_min']:.4f}..{r['r2_within_k_max']:.4f}) | "
            f"{r['coverage_mean']:.3f} ({r['coverage_min']:.2f}..{r['coverage_max']:.2f}) | "
            f"{r['best_in_top_share']:.2f} | {r['best_exact']:.2f} | "
            f"{r['best_share_worst']:.3f} |"
        )
    lines += [
        "",
        "## Extrapolation in k: f(k) the per-size law",
        "",
        f"The same designs restricted to k = 1..{s['extrapolate_from']}, fitted with "
        "`curve='law'` (b by evidence), predicting every subset of the larger sizes (each "
        "flagged as extrapolated).",
        "",
        "| method | curve | fitted k | predicted k | subsets | mean abs error (min..max) "
        "| R^2 within k mean | coverage mean (min..max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["extrapolation"]:
        lines.append(
            f"| {r['method']} | {r['domain']} | {r['fitted_k']} | {r['predicted_k']} | "
            f"{r['subsets_predicted']} | {r['mean_abs_error_mean']:.4f} "
            f"({r['mean_abs_error_min']:.4f}..{r['mean_abs_error_max']:.4f}) | "
            f"{r['r2_within_k_mean']:.3f} | {r['coverage_mean']:.2f} "
            f"({r['coverage_min']:.2f}..{r['coverage_max']:.2f}) |"
        )
    t = s["timing"]
    lines += [
        "",
        "## Speed",
        "",
        f"Synthetic pool of {t['experts']} experts, {t['records']:,} distinct subsets (sizes "
        f"uniform in 1..{t['experts']}); median of {t['repeats']} runs in a fresh process per "
        f"BLAS thread setting. `select`: every size and overall, top 1, {t['draws']} draws. "
        f"Targets: fit < {TARGET_FIT_S:g} s, select < {TARGET_SELECT_S:g} s.",
        "",
        "| BLAS threads | load average before | fit (s) | select (s) | select ranked by |",
        "|---|---|---|---|---|",
    ]
    for r in result["timing"]:
        lines.append(
            f"| {r['blas_threads']} | {r['load_average_before']:.2f} | {r['fit_s_median']:.2f} "
            f"| {r['select_s_median']:.2f} | {', '.join(r['select_methods'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
