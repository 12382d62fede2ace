"""Predict before you merge: the geometry pool model against every subset merged, on the demo pool.

For each method (average, task arithmetic at the paper's lambda 0.8, TIES and DARE-linear at
density 0.5), every one of the 255 subsets of the demo's 8 experts is merged and evaluated once
(the truth, cached in ``--work``, resumable). Then, on the cross-domain CE:

- zero merges: the second-order prediction (exact Hessian and Gauss-Newton from every sequence,
  the Hessian from a quarter and an eighth of each domain's sequences): within-k R^2 (of the
  deviations from each size's mean, both sides centred: the shape) and Spearman within each k,
  overall R^2 (level included), the law's floor and tail of the predicted pool curve against the
  law fitted on every subset, and the true rank of each size's predicted best subset;
- calibrated on N merges (``calibration_subsets``; their CE read from the truth): within-k R^2
  with each size's level counted (``pool_model.within_k_r2``), the worst relative error of the
  pool curve E[L | k] over k = 1..8, interval coverage over every subset;
- the cost: the geometry's seconds against 2M merge-and-evaluate steps timed beside it.

    PYTHONPATH=. python benchmarks/pool_geometry.py --work /tmp/geometry-bench   # ~10 min
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_io import save_results

from hf_mergelaw.cross_entropy import cross_entropy
from hf_mergelaw.demo.pool import build_or_load_pool, default_cache_dir
from hf_mergelaw.demo.run import demo_corpus, demo_eval_set
from hf_mergelaw.demo.settings import FULL
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.geometry import method_models
from hf_mergelaw.law import fit_sweep
from hf_mergelaw.pool_model import (
    PoolModel,
    calibrate,
    calibration_subsets,
    pool_curve,
    pool_law,
    pool_records,
    shape_r2,
    spearman_within_k,
    within_k_r2,
)
from hf_mergelaw.record_schema import CROSS_DOMAIN
from hf_mergelaw.sweep import sweep_pool
from hf_mergelaw.sweep_config import SamplingConfig
from hf_mergelaw.sweep_methods import MethodSpec

METHODS = [
    {"name": "average"},
    {"name": "task_arithmetic", "lambda": 0.8},
    {"name": "ties", "density": 0.5},
    {"name": "dare_linear", "density": 0.5},
]
# (curvature, share of each domain's sequences it is taken from)
SETTINGS = (("hessian", 1.0), ("ggn", 1.0), ("hessian", 0.25), ("hessian", 0.125))
TOP_SHARE = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/geometry-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = demo_corpus(FULL)
    files = build_or_load_pool(FULL.pool, corpus, default_cache_dir(), progress=False)
    pool = ExpertPool(files.base_dir, files.experts, device="cpu", dtype=torch.float32)
    eval_set = demo_eval_set(files.base_dir, corpus, FULL)
    methods = [MethodSpec.from_config(entry) for entry in METHODS]
    truth_path = args.work / "every_subset.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    sweep_pool(
        pool,
        eval_set,
        methods=methods,
        ks=range(1, len(pool.names) + 1),
        sampling=SamplingConfig(strategy="all"),
        output=truth_path,
        batch_size=FULL.sweep.eval_batch_size,
        progress=False,
    )
    truth = {
        g.group["method"]: g
        for g in pool_records(truth_path, by=("method", "domain"))
        if g.group["domain"] == CROSS_DOMAIN
    }
    laws = {
        f.group["method"]: f.params
        for f in fit_sweep(truth_path, "per-size", by=("method", "domain"), bootstrap=0).fits
        if f.group["domain"] == CROSS_DOMAIN
    }
    rows = []
    for method in methods:
        for curvature, sample in SETTINGS:
            start = time.perf_counter()
            models = method_models(
                pool, eval_set, method, curvature, FULL.sweep.eval_batch_size, 0.9, sample
            )
            seconds = time.perf_counter() - start
            prior = next(m for m in models if m.group["domain"] == CROSS_DOMAIN)
            steps = calibration_subsets(prior.experts, 2 * prior.m)
            how = curvature if sample == 1 else f"{curvature}, {sample:g} of the sequences"
            rows.append(
                score(method.label, how, prior, truth[method.label], laws[method.label])
                | {
                    "curvature_sample": sample,
                    "geometry_s": seconds,
                    "two_m_steps_s": merge_eval_seconds(pool, eval_set, method, steps),
                }
            )
            print(_line(rows[-1]), flush=True)
    where = setting(args.threads)
    name = f"pool_geometry_cpu_{time.strftime('%Y-%m-%d')}"
    print(save_results(args.out, name, {"setting": where, "rows": rows}, render(rows, where)))


def score(
    method: str, curvature: str, prior: PoolModel, truth: Any, law: dict[str, float]
) -> dict[str, Any]:
    """Zero-merge and calibrated accuracy of one method's geometry against every subset."""
    members, ce, k = truth.members, truth.ce, truth.k
    m = prior.m
    predicted = prior.predict(members).mean
    geometry_law = pool_law(prior)
    row: dict[str, Any] = {
        "method": method,
        "curvature": curvature,
        "zero": {
            "shape_r2": shape_r2(ce, predicted, k),
            "spearman": spearman_within_k(ce, predicted, k),
            "overall_r2": 1 - np.sum((ce - predicted) ** 2) / np.sum((ce - ce.mean()) ** 2),
            "floor": geometry_law["L_inf"],
            "floor_fitted": law["L_inf"],
            "floor_error": geometry_law["L_inf"] / law["L_inf"] - 1,
            "tail": geometry_law["A"],
            "tail_fitted": law["A"],
            "b_fitted": law["b"],
            "tail_error": geometry_law["A"] / law["A"] - 1,
            "worst_best_rank_share": _worst_best_rank(ce, predicted, k, m),
        },
        "calibrated": {},
    }
    names = prior.experts
    for n in sorted({m + 2, m + 4, 2 * m}):
        chosen = calibration_subsets(names, n)
        rows = [_row_of(truth, subset) for subset in chosen]
        calibration = type(truth)(truth.group, truth.experts, members[rows], ce[rows], tuple(rows))
        model = calibrate(prior, calibration)
        prediction = model.predict(members)
        curve = {p.k: p.mean for p in pool_curve(model)}
        curve_error = max(abs(curve[size] / ce[k == size].mean() - 1) for size in range(1, m + 1))
        row["calibrated"][str(n)] = {
            "r2_within_k": within_k_r2(ce, prediction.mean, k),
            "shape_r2": shape_r2(ce, prediction.mean, k),
            "curve_error": curve_error,
            "coverage": float(np.mean((ce >= prediction.lo) & (ce <= prediction.hi))),
            "worst_best_rank_share": _worst_best_rank(ce, prediction.mean, k, m),
            "warnings": len(model.warnings),
        }
    return row


def _row_of(truth: Any, subset: tuple[str, ...]) -> int:
    target = np.isin(np.array(truth.experts), subset)
    return int(np.flatnonzero((truth.members == target).all(axis=1))[0])


def _worst_best_rank(ce: np.ndarray, predicted: np.ndarray, k: np.ndarray, m: int) -> float:
    """Over k = 2..M-1: the largest share of a size's subsets that measure better than the
    one the prediction ranks best (0 = it is the true best; under 0.05 = in the true top 5%)."""
    worst = 0.0
    for size in range(2, m):
        here = np.flatnonzero(k == size)
        chosen = here[np.argmin(predicted[here])]
        worst = max(worst, float(np.sum(ce[here] < ce[chosen])) / here.size)
    return worst


def merge_eval_seconds(
    pool: ExpertPool, eval_set: Any, method: MethodSpec, subsets: list[tuple[str, ...]]
) -> float:
    """Seconds to merge and evaluate ``subsets`` as a sweep does, measured beside the geometry
    (same machine, same moment)."""
    start = time.perf_counter()
    for subset in subsets:
        pool.merge(method, subset)
        cross_entropy(pool.model, eval_set, batch_size=FULL.sweep.eval_batch_size)
    pool.restore_base()
    return time.perf_counter() - start


def setting(threads: int) -> str:
    return (
        f"demo pool (FULL: 8 experts of a {FULL.pool.num_layers}-layer, hidden "
        f"{FULL.pool.hidden_size} Llama, 0.93M parameters, float32), eval set of 128 sequences "
        f"(16k tokens, 8 domains), cross-domain CE; CPU, {threads} torch threads, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; 2M "
        "merge-and-evaluate steps timed beside each geometry"
    )


def _line(row: dict[str, Any]) -> str:
    z = row["zero"]
    return (
        f"{row['method']:<16} {row['curvature']:<8} shape R2 {z['shape_r2']:.3f} "
        f"spearman {z['spearman']:.3f} floor {z['floor_error']:+.4%} tail {z['tail_error']:+.1%} "
        f"best {z['worst_best_rank_share']:.3f}  {row['geometry_s']:.1f} s "
        f"(2M steps {row['two_m_steps_s']:.1f} s)"
    )


def render(rows: list[dict[str, Any]], where: str) -> str:
    lines = [
        "# The geometry pool model against every subset merged",
        "",
        f"Setting: {where}. Date: {time.strftime('%Y-%m-%d')}. "
        "Command: `PYTHONPATH=. python benchmarks/pool_geometry.py --work /tmp/geometry-bench`.",
        "",
        "## Zero merges",
        "",
        "| method | curvature | within-k R^2 (shape) | Spearman within k | overall R^2 | floor "
        "error | tail A error (fitted b) | share better than the predicted best (worst k=2..7) | "
        "geometry s | 2M merge+eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        z = row["zero"]
        lines.append(
            f"| {row['method']} | {row['curvature']} | {z['shape_r2']:.3f} | "
            f"{z['spearman']:.3f} | {z['overall_r2']:.3f} | {z['floor_error']:+.3%} | "
            f"{z['tail_error']:+.1%} (b={z['b_fitted']:.2f}) | "
            f"{z['worst_best_rank_share']:.1%} | {row['geometry_s']:.1f} | "
            f"{row['two_m_steps_s']:.1f} |"
        )
    lines += [
        "",
        "## Calibrated on N merges (every expert alone, the full pool, pairs, half-pool merges)",
        "",
        "| method | curvature | N | within-k R^2 (level counted) | pool curve worst error | "
        "90% coverage (all 255) | share better than the predicted best | warnings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for n, c in row["calibrated"].items():
            lines.append(
                f"| {row['method']} | {row['curvature']} | {n} | {c['r2_within_k']:.3f} | "
                f"{c['curve_error']:.3%} | {c['coverage']:.3f} | "
                f"{c['worst_best_rank_share']:.1%} | {c['warnings']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
