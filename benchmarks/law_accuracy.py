"""Accuracy of the scaling-law engine on synthetic sweeps from the paper's fits.

1. Interval coverage at a held-out size: fit the joint law on 0.5-32B, predict 72B, and count how
   often the 90% mean-curve interval covers the true (population) curve over many sweeps, in
   three scatter settings (`hf_mergelaw.law.synthetic`): independent subsets, pool-centred
   experts, and each size's experts drawn from a population; the paper's design (all subsets up
   to 7B, 15 above). Also: how many of those joint fits failed to converge.
1b. Single-merge prediction intervals: per-size fits at 7B on 5 of the subsets per k of one pool,
   scored on the held-out merges of that pool at k = 1 and k = M - 1.
2. The same fit against a brute-force reference: weighted least squares from many uniform random
   starts in a box, best cost kept; its weighted SSE and its error at 72B.
3. Three-point recipe: forecast k = 9 from the cell means at k = 1, 2, 4 for all 27 paper fits,
   with the sampled sizes' subsets drawn uniformly or balanced (every expert equally often).

Run from the repository root (about 15 minutes on 2 cores with the defaults):
  python benchmarks/law_accuracy.py --machine "2-core CPU CI machine"
writes benchmarks/results/law_accuracy_cpu_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

import numpy as np
from results_io import save_results
from scipy.optimize import least_squares

from hf_mergelaw.errors import FitError
from hf_mergelaw.law import fit_law, plan
from hf_mergelaw.law.laws import JOINT
from hf_mergelaw.law.paper import joint_fits, variance_fits
from hf_mergelaw.law.synthetic import joint_mean, synthetic_sweep

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZES = (0.5, 1.5, 3.0, 7.0, 14.0, 32.0)
HELD_OUT = 72.0
KS = np.arange(1, 10)
SCATTERS = ("independent", "pool", "population")
STUDIES = ("coverage", "single_merge", "brute_force", "three_point")


def paper_sweep(key: tuple[str, str], **options: object) -> list[dict]:
    """Means from the paper's joint fit ``key``, scatter from the Average variance fit of its
    domain (the paper's Table 6 covers Average only)."""
    return synthetic_sweep(joint_fits()[key], variance_fits()[("average", key[1])], **options)


def coverage(key: tuple[str, str], sweeps: int, bootstrap: int, level: float, scatter: str) -> dict:
    """Per-k coverage of the mean-curve interval at the held-out size over ``sweeps`` sweeps."""
    truth = joint_mean(joint_fits()[key], HELD_OUT, KS)
    hits, errors, widths, failed = [], [], [], 0
    for rep in range(sweeps):
        records = paper_sweep(key, sizes=TRAIN_SIZES, scatter=scatter, seed=1000 + rep)
        try:
            fit = fit_law(
                records, "joint", bootstrap=bootstrap, seed=rep, level=level, variance=False
            )
        except FitError:
            failed += 1
            continue
        pred = fit.predict(HELD_OUT, KS)
        hits.append((pred.lo <= truth) & (truth <= pred.hi))
        errors.append(pred.mean / truth - 1)
        widths.append((pred.hi - pred.lo) / truth)
    hits, errors = np.array(hits), np.array(errors)
    return {
        "method": key[0],
        "domain": key[1],
        "scatter": scatter,
        "sweeps": sweeps,
        "failed_fits": failed,
        "coverage": float(hits.mean()),
        "coverage_by_k": hits.mean(axis=0).round(3).tolist(),
        "coverage_se": float(hits.mean(axis=1).std(ddof=1) / np.sqrt(len(hits))),
        "median_abs_rel_error": float(np.median(np.abs(errors))),
        "median_rel_width": float(np.median(widths)),
    }


def single_merge(key: tuple[str, str], pools: int, bootstrap: int, scatter: str) -> dict:
    """Coverage of the 90% single-merge interval on the held-out merges of the fitted pool."""
    rng = np.random.default_rng(7)
    hits: dict[int, list[bool]] = {1: [], 8: []}
    for rep in range(pools):
        every = paper_sweep(key, sizes=(7.0,), subsets="all", scatter=scatter, seed=2000 + rep)
        by_k: dict[int, list[dict]] = {}
        for record in every:
            by_k.setdefault(record["k"], []).append(record)
        train, held = [], []
        for rows in by_k.values():
            order = rng.permutation(len(rows))
            train += [rows[i] for i in order[:5]]
            held += [rows[i] for i in order[5:]]
        fit = fit_law(train, "per-size", bootstrap=bootstrap, seed=rep)
        for k in hits:
            ce = np.array([r["ce"] for r in held if r["k"] == k])
            pred = fit.predict(7.0, float(k))
            hits[k] += list((pred.pi_lo[0] <= ce) & (ce <= pred.pi_hi[0]))
    return {
        "method": key[0],
        "domain": key[1],
        "scatter": scatter,
        "pools": pools,
        "coverage_k1": float(np.mean(hits[1])),
        "coverage_k8": float(np.mean(hits[8])),
        "held_out_per_k": len(hits[1]),
    }


def brute_force_fit(
    N: np.ndarray, k: np.ndarray, y: np.ndarray, starts: int, rng: np.random.Generator
) -> object:
    """Best weighted (w = k) least-squares fit of the joint law from uniform starts in a box."""
    x, sqrt_w = {"N": N, "k": k.astype(float)}, np.sqrt(k)
    box = np.array([1.0, 1.0, 3.0, 1.0, 3.0, 5.0])  # L_star, B, beta, A0, gamma, b
    fits = (
        least_squares(
            lambda t: (JOINT.evaluate(t, x) - y) * sqrt_w, start, bounds=(JOINT.lower, JOINT.upper)
        )
        for start in rng.uniform(0, 1, (starts, box.size)) * box
    )
    return min(fits, key=lambda r: r.cost)


def against_brute_force(key: tuple[str, str], sweeps: int, starts: int) -> dict:
    """Our multi-start fit versus the best of ``starts`` random-start fits, on the same cells."""
    truth = joint_mean(joint_fits()[key], HELD_OUT, KS)
    at_72 = {"N": np.full(KS.size, HELD_OUT), "k": KS.astype(float)}
    rng = np.random.default_rng(0)
    sse_ratio, ours_error, reference_error = [], [], []
    for rep in range(sweeps):
        records = paper_sweep(key, sizes=TRAIN_SIZES, seed=2000 + rep)
        fit = fit_law(records, "joint", variance=False)
        cells = fit.cells
        reference = brute_force_fit(cells.N, cells.k, cells.observed, starts, rng)
        ours_sse = np.sum(cells.k * (cells.fitted - cells.observed) ** 2)
        sse_ratio.append(ours_sse / (2 * reference.cost))
        ours_error.append(np.max(np.abs(fit.predict(HELD_OUT, KS).mean / truth - 1)))
        reference_error.append(np.max(np.abs(JOINT.evaluate(reference.x, at_72) / truth - 1)))
    sse_ratio = np.array(sse_ratio)
    return {
        "method": key[0],
        "domain": key[1],
        "sweeps": sweeps,
        "starts": starts,
        "ours_sse_at_most_reference": float(np.mean(sse_ratio <= 1 + 1e-6)),
        "worst_sse_ratio": float(sse_ratio.max()),
        "median_max_error_ours": float(np.median(ours_error)),
        "median_max_error_reference": float(np.median(reference_error)),
    }


def three_point(design: str, subsets: int | str, seeds: int) -> dict:
    """Relative error of the k = 9 forecast against the true mean, by size, over all paper fits."""
    errors: dict[float, list[float]] = {}
    for i, (key, params) in enumerate(sorted(joint_fits().items())):
        for seed in range(seeds):
            # A seed per fit and sweep: every sweep draws its own expert effects and subsets.
            records = paper_sweep(
                key,
                subsets=subsets,
                design=design,
                seed=seeds * i + seed,
            )
            for p in plan(fit_law(records, "joint", variance=False)):
                tp = p.three_point
                rel = np.nan if tp is None else abs(tp.forecast / joint_mean(params, p.N, 9) - 1)
                errors.setdefault(p.N, []).append(rel)
    rows = []
    for size, errs in errors.items():
        e = np.array(errs)
        rows.append(
            {
                "N": size,
                "forecasts": int(np.isfinite(e).sum()),
                "no_forecast": int(np.isnan(e).sum()),
                "median": float(np.nanmedian(e)),
                "p90": float(np.nanquantile(e, 0.9)),
                "within_1pct": float(np.mean(e < 0.01)),
            }
        )
    return {"design": design, "subsets": subsets, "by_size": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--pools", type=int, default=100, help="pools of the single-merge study")
    parser.add_argument("--seeds", type=int, default=3, help="three-point sweeps per paper fit")
    parser.add_argument("--reference-sweeps", type=int, default=100)
    parser.add_argument("--reference-starts", type=int, default=100)
    parser.add_argument(
        "--studies", default=",".join(STUDIES), help=f"comma-separated subset of {STUDIES}"
    )
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    keys = [("average", "algebra"), ("average", "code"), ("ties", "geometry")]
    studies = set(args.studies.split(","))
    result = {
        "benchmark": "law_accuracy",
        "machine": args.machine,
        "date": args.date,
        "command": shlex.join(["python", "benchmarks/law_accuracy.py", *sys.argv[1:]]),
        "level": 0.9,
    }
    if "coverage" in studies:
        result["coverage"] = [
            coverage(k, args.sweeps, args.bootstrap, 0.9, scatter)
            for scatter in SCATTERS
            for k in keys
        ]
    if "single_merge" in studies:
        result["single_merge"] = [
            single_merge(k, args.pools, args.bootstrap, scatter)
            for scatter in SCATTERS
            for k in keys
        ]
    if "brute_force" in studies:
        result["brute_force"] = [
            against_brute_force(k, args.reference_sweeps, args.reference_starts) for k in keys
        ]
    if "three_point" in studies:
        result["three_point"] = [
            three_point("uniform", "paper", args.seeds),
            three_point("balanced", "paper", args.seeds),
            three_point("balanced", 18, args.seeds),
        ]
    save_results(args.out_dir, f"law_accuracy_cpu_{args.date}", result, render(result))
    print(render(result))


def render(result: dict) -> str:
    lines = [
        "# law_accuracy: interval coverage at a held-out size, three-point recipe",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Command: `{result['command']}`",
    ]
    if "coverage" in result:
        lines += [
            "",
            "## 90% mean-curve interval at 72B, joint law fitted on 0.5-32B",
            "",
            "The paper's design (all subsets up to 7B, 15 above); truth: the population curve "
            "(the law). Scatter: `independent` subsets; `pool`: a subset's deviation is the mean "
            "of its members' effects, centred on each size's pool (cells holding every subset "
            "sit on the law); `population`: each size's experts drawn from a population, so a "
            "pool's cells sit off the law by its experts' mean effect. Intervals: the default "
            "(`target=population`): subsets resampled within cells plus the shift of a "
            "resampled pool of experts.",
            "",
            "| scatter | fit | sweeps | failed fits | coverage (± s.e.) | by k = 1..9 "
            "| median abs error | median width |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in result["coverage"]:
            lines.append(
                f"| {c['scatter']} | {c['method']}/{c['domain']} | {c['sweeps']} | "
                f"{c['failed_fits']} | {c['coverage']:.3f} ± {c['coverage_se']:.3f} | "
                f"{' '.join(f'{v:.2f}' for v in c['coverage_by_k'])} | "
                f"{c['median_abs_rel_error']:.2%} | {c['median_rel_width']:.2%} |"
            )
    if "single_merge" in result:
        lines += [
            "",
            "## 90% single-merge interval on held-out merges of the fitted pool",
            "",
            "Per-size fit at 7B on 5 subsets per k of a pool of 9 (all of them at k = 9); scored "
            "on the pool's other merges at k = 1 and k = 8 (4 each per pool).",
            "",
            "| scatter | fit | pools | coverage at k = 1 | coverage at k = 8 |",
            "|---|---|---|---|---|",
        ]
        for c in result["single_merge"]:
            lines.append(
                f"| {c['scatter']} | {c['method']}/{c['domain']} | {c['pools']} | "
                f"{c['coverage_k1']:.3f} | {c['coverage_k8']:.3f} |"
            )
    if "brute_force" not in result:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "## The same fit against a brute-force multi-start reference",
        "",
        "Pool scatter, the paper's design, fitted on 0.5-32B. Reference: weighted least squares "
        "(weights k) from uniform random starts in a box, best cost kept. Error: the largest "
        "relative error over k = 1..9 at 72B, median over sweeps.",
        "",
        "| fit | sweeps | reference starts | our weighted SSE <= reference | worst SSE ratio "
        "| our error | reference error |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in result["brute_force"]:
        lines.append(
            f"| {b['method']}/{b['domain']} | {b['sweeps']} | {b['starts']} | "
            f"{b['ours_sse_at_most_reference']:.0%} | {b['worst_sse_ratio']:.6f} | "
            f"{b['median_max_error_ours']:.2%} | {b['median_max_error_reference']:.2%} |"
        )
    lines += [
        "",
        "## Three-point recipe: k = 9 forecast from k = 1, 2, 4, error against the true mean",
        "",
        "All 27 paper fits, pool scatter (a subset's deviation is the mean of its members' "
        "effects). `paper`: all subsets up to 7B, 15 above.",
        "",
        "| design | subsets | N | forecasts | none | median error | p90 error | within 1% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in result["three_point"]:
        for r in t["by_size"]:
            lines.append(
                f"| {t['design']} | {t['subsets']} | {r['N']:g} | {r['forecasts']} | "
                f"{r['no_forecast']} | {r['median']:.2%} | {r['p90']:.2%} | "
                f"{r['within_1pct']:.0%} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
