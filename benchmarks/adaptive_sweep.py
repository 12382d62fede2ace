"""Adaptive sweeps against the balanced design: accuracy per merge on the demo pool.

Input: the records of a sweep that merged every subset (`hf-mergelaw demo --subsets all`), so any
design can be replayed and every subset it did not merge scored. Per method (its cross-domain
"macro" curve) and seed:

- balanced: `--per-k` subsets per k (benchmarks/pool_model.py's design_mask, strategy "balanced");
- adaptive at each `--budgets` value: `hf_mergelaw.adaptive.next_round`, the function
  `sweep_pool` calls between rounds, with one pick per round (one rank); a "merge" looks up the
  subset's measured record in the table. It stops at the budget or when the answer is settled;
- the same with each of `--prior-kinds` (`sampling.prior` of an adaptive sweep: `weights`, the
  default, and `curvature`; `hf_mergelaw.priors` on the demo's cached pool, which must be the
  pool the table was measured on): `--prior-balanced-per-k` and `--prior-budgets`. Designs with
  a prior are fitted and scored with it. Every method gets every prior here, also where an
  adaptive sweep leaves it out (TIES's weight prior: `adaptive.has_prior`), to show why.

The reference is the issue's: the balanced design of `--reference-per-k`, fitted without a prior.
Each design's pool model (f(k) free) is scored as benchmarks/pool_model.py scores it (R^2 of the
within-k deviations and coverage of the `--level` intervals on every subset the design did not
merge; for k = 2..M-1 the share of the size's measured CEs below the chosen best subset), and its
pool curve E[L | k] against the mean of every subset of the size (largest error, coverage of its
intervals). The same designs are scored on each domain's curve (fitted on the same subsets).

Run from the repository root:
  hf-mergelaw demo --subsets all -o /tmp/demo-all --no-progress
  OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/adaptive_sweep.py \\
      /tmp/demo-all/records.jsonl --machine "2-core CPU"
writes benchmarks/results/adaptive_sweep_cpu_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
import torch
from pool_geometry import merge_eval_seconds
from pool_model import TOP_SHARE, design_mask, min_mean_max, restricted, score_model
from results_io import save_results

from hf_mergelaw.adaptive import (
    CURVE_SETTLED,
    FEATURES,
    P_BEST_SETTLED,
    SCORE_SETTLED,
    has_prior,
    start_counts,
)
from hf_mergelaw.adaptive import replay as adaptive_replay
from hf_mergelaw.demo.pool import build_or_load_pool, default_cache_dir
from hf_mergelaw.demo.run import demo_corpus, demo_eval_set
from hf_mergelaw.demo.settings import FULL
from hf_mergelaw.experts import ExpertPool
from hf_mergelaw.files import read_jsonl
from hf_mergelaw.pool_model import (
    EffectPrior,
    PoolRecords,
    coverage,
    fit_pool,
    pool_curve,
    pool_records,
)
from hf_mergelaw.priors import CURVATURE_SAMPLE, pool_curvature_prior, pool_weight_prior
from hf_mergelaw.record_schema import CROSS_DOMAIN
from hf_mergelaw.sweep_methods import MethodSpec

REPO = Path(__file__).resolve().parents[1]
# The accuracy targets (fitted on the 64-subset balanced sweep): R^2 within k per
# method, the coverage band of the 90% intervals, the chosen best within the top 5% of its size.
R2_TARGET = {"average": 0.95, "ties_fused": 0.90}
COVERAGE_BAND = (0.85, 0.95)
# "The same accuracy" as the balanced design: mean R^2 within this much of its mean.
R2_TOLERANCE = 0.005
# Why a replay stopped, by the first word of next_round's message.
STOPS = {"budget": "budget", "settled": "settled", "every": "all merged"}


def replay(
    table: list[dict],
    method: str,
    experts: list[str],
    budget: int,
    seed: int,
    prior: EffectPrior | None,
) -> tuple[list[dict], str, int]:
    """An adaptive sweep of ``method`` with merges looked up in ``table``: its records, why it
    stopped, and its rounds."""
    measured = {frozenset(r["subset"]): r for r in table if r["method"] == method}
    run = adaptive_replay(
        lambda picks, _: [measured[frozenset(subset)] for subset in picks],
        method=method,
        experts=experts,
        ks=range(1, len(experts) + 1),
        budget=budget,
        seed=seed,
        prior=prior,
    )
    return run.records, run.stop, len(run.rounds)


def mask_of(group: PoolRecords, records: list[dict]) -> np.ndarray:
    index = {frozenset(subset): i for i, subset in enumerate(group.subsets())}
    mask = np.zeros(len(group), dtype=bool)
    mask[[index[frozenset(r["subset"])] for r in records]] = True
    return mask


def score(
    group: PoolRecords, mask: np.ndarray, level: float, draws: int, prior: EffectPrior | None
) -> dict:
    """benchmarks/pool_model.py's scores, and the pool curve against every subset's mean."""
    model = fit_pool(restricted(group, mask), level=level, prior=prior)
    out = score_model(group, mask, model, draws)
    curve = pool_curve(model)
    truth = np.array([group.ce[group.k == point.k].mean() for point in curve])
    out["curve_max_error"] = float(max(abs(p.mean - t) for p, t in zip(curve, truth, strict=True)))
    out["curve_coverage"] = coverage(
        truth, np.array([p.lo for p in curve]), np.array([p.hi for p in curve])
    )
    return out


def summarise(label: str, scores: list[dict], extra: dict) -> dict:
    shares = [share for s in scores for share in s["best_share_by_k"].values()]
    return {
        "design": label,
        **extra,
        "merges_mean": float(np.mean([s["records"] for s in scores])),
        "merges_max": int(max(s["records"] for s in scores)),
        **min_mean_max("r2_within_k", [s["r2_within_k"] for s in scores]),
        **min_mean_max("coverage", [s["coverage"] for s in scores]),
        "best_in_top_share": float(np.mean(np.array(shares) < TOP_SHARE)),
        "best_exact": float(np.mean(np.array(shares) == 0.0)),
        "best_share_worst": float(max(shares)),
        **min_mean_max("curve_max_error", [s["curve_max_error"] for s in scores]),
        "curve_coverage_mean": float(np.mean([s["curve_coverage"] for s in scores])),
    }


def method_config(table: list[dict], label: str) -> dict:
    """The sweep config entry of the table's method ``label``."""
    record = next(r for r in table if r["method"] == label)
    return {"name": record["method_name"], **record["params"]}


def method_priors(table: list[dict], kinds: list[str]) -> dict[tuple[str, str], dict]:
    """Each (prior kind, method)'s prior and the seconds it took, from the demo's cached pool
    (built if missing) and its eval data, as an adaptive sweep of the demo would compute them."""
    if not kinds:
        return {}
    corpus = demo_corpus(FULL)
    files = build_or_load_pool(FULL.pool, corpus, default_cache_dir(), progress=False)
    pool = ExpertPool(files.base_dir, files.experts, device="cpu", dtype=torch.float32)
    eval_set = demo_eval_set(files.base_dir, corpus, FULL)
    singles = [(name,) for name in sorted(pool.names)]
    specs = {r["method"]: MethodSpec.from_config(method_config(table, r["method"])) for r in table}
    out = {}
    for kind in kinds:
        for label, spec in specs.items():
            start = time.perf_counter()
            # Each prior on every method, TIES's weight prior too (which an adaptive sweep
            # leaves out: adaptive.has_prior), so the rows show what it would do.
            prior = (
                pool_weight_prior(pool, spec)
                if kind == "weights"
                else pool_curvature_prior(
                    pool, eval_set, spec, batch_size=FULL.sweep.eval_batch_size
                )
            )
            seconds = time.perf_counter() - start
            merge_s = merge_eval_seconds(pool, eval_set, spec, singles) / len(singles)
            out[kind, label] = {"prior": prior, "seconds": seconds, "merge_eval_s": merge_s}
    return out


def study(path: Path, args: argparse.Namespace) -> list[dict]:
    table = [record for _, record in read_jsonl(path)]
    groups = pool_records(table)
    priors = method_priors(table, args.prior_kinds)
    out = []
    for group in groups:
        if group.group["domain"] != CROSS_DOMAIN:
            continue
        method, m = group.group["method"], len(group.experts)
        if len(group) != 2**m - 1:
            raise SystemExit(
                f"{path}: {group.label()} has {len(group)} of {2**m - 1} subsets; this study "
                "needs a sweep of every subset (hf-mergelaw demo --subsets all)"
            )
        domains = [g for g in groups if g.group["method"] == method and g is not group]
        designs = [("balanced", per_k, None, None) for per_k in args.balanced_per_k]
        designs += [("adaptive", None, budget, None) for budget in args.budgets]
        for prior_kind in args.prior_kinds:
            designs += [("balanced", n, None, prior_kind) for n in args.prior_balanced_per_k]
            designs += [("adaptive", None, n, prior_kind) for n in args.prior_budgets]
        for kind, per_k, budget, prior_kind in designs:
            prior = None if prior_kind is None else priors[prior_kind, method]["prior"]
            start = time.perf_counter()
            scores, domain_scores, stops, rounds = [], [], Counter(), []
            for seed in range(args.designs):
                if kind == "balanced":
                    mask = design_mask(group, per_k, seed)
                else:
                    records, stop, n_rounds = replay(
                        table, method, list(group.experts), budget, seed, prior
                    )
                    mask = mask_of(group, records)
                    stops[STOPS[stop.split()[0]]] += 1
                    rounds.append(n_rounds)
                scores.append(score(group, mask, args.level, args.draws, prior))
                domain_scores += [score(d, mask, args.level, args.draws, prior) for d in domains]
            label = (
                f"balanced, {per_k} per k" if kind == "balanced" else f"adaptive, budget {budget}"
            ) + ("" if prior_kind is None else f", {prior_kind} prior")
            extra = {
                "method": method,
                "experts": m,
                "kind": kind,
                "per_k": per_k,
                "budget": budget,
                "prior": prior_kind,
                "sweep_uses_prior": prior_kind is None
                or has_prior(prior_kind, MethodSpec.from_config(method_config(table, method))),
                **{
                    f"prior_{key}": None if prior_kind is None else priors[prior_kind, method][key]
                    for key in ("seconds", "merge_eval_s")
                },
            }
            if kind == "adaptive":
                extra |= {"stops": dict(stops), "rounds_mean": float(np.mean(rounds))}
            row = summarise(label, scores, extra)
            row["domains"] = summarise(label, domain_scores, {})
            row["seconds"] = time.perf_counter() - start
            out.append(row)
            print(f"{method}, {label}: R^2 {row['r2_within_k_mean']:.4f}", flush=True)
    return out


def meets_targets(row: dict) -> bool:
    """The issue's accuracy targets (see :data:`R2_TARGET`)."""
    return (
        row["r2_within_k_mean"] >= R2_TARGET.get(row["method"], min(R2_TARGET.values()))
        and COVERAGE_BAND[0] <= row["coverage_mean"] <= COVERAGE_BAND[1]
        and row["best_in_top_share"] == 1.0
    )


def matches(row: dict, reference: dict) -> dict[str, bool]:
    """Each score of ``row`` as good as the reference design's."""
    return {
        "r2_within_k": row["r2_within_k_mean"] >= reference["r2_within_k_mean"] - R2_TOLERANCE,
        "coverage": COVERAGE_BAND[0] <= row["coverage_mean"] <= COVERAGE_BAND[1],
        "best_in_top_5%": row["best_in_top_share"] >= reference["best_in_top_share"],
        "pool_curve": row["curve_max_error_mean"] <= reference["curve_max_error_mean"],
    }


def verdicts(rows: list[dict], reference_per_k: int) -> list[dict]:
    """Per method and prior: the fewest adaptive merges (the most over seeds, at the first
    budget tried that does it) that match the reference balanced design (no prior), score by
    score, and that meet the issue's targets; and the fewest balanced merges that meet them."""
    out = []
    for method, prior in dict.fromkeys((r["method"], r["prior"]) for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["merges_max"])
        reference = next(
            r
            for r in mine
            if r["kind"] == "balanced" and r["per_k"] == reference_per_k and r["prior"] is None
        )
        mine = [r for r in mine if r["prior"] == prior]
        adaptive = [r for r in mine if r["kind"] == "adaptive"]
        balanced = [r for r in mine if r["kind"] == "balanced"]
        out.append(
            {
                "method": method,
                "prior": prior or "none",
                "sweep_uses_prior": mine[0]["sweep_uses_prior"],
                "reference": reference["design"],
                "reference_merges": reference["merges_max"],
                "half": reference["merges_max"] / 2,
                "adaptive_merges_to_match": {
                    name: next(
                        (r["merges_max"] for r in adaptive if matches(r, reference)[name]), None
                    )
                    for name in matches(reference, reference)
                },
                "adaptive_merges_to_targets": _first(adaptive, meets_targets),
                "balanced_merges_to_targets": _first(balanced, meets_targets),
            }
        )
    return out


def _first(rows: list[dict], test: Callable[[dict], bool]) -> int | None:
    return next((r["merges_max"] for r in rows if test(r)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("--designs", type=int, default=20, help="seeds per design")
    parser.add_argument("--budgets", type=int, nargs="+", default=[28, 32, 36, 40, 45, 50, 57])
    parser.add_argument("--balanced-per-k", type=int, nargs="+", default=[4, 5, 6, 8])
    parser.add_argument("--prior-kinds", nargs="*", default=["weights", "curvature"])
    parser.add_argument("--prior-budgets", type=int, nargs="*", default=[20, 22, 24, 26, 28])
    parser.add_argument("--prior-balanced-per-k", type=int, nargs="*", default=[3, 4, 8])
    parser.add_argument("--reference-per-k", type=int, default=8)
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--draws", type=int, default=1000, help="posterior draws of select")
    parser.add_argument("--machine", default="CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = study(args.records, args)
    m = rows[0]["experts"]
    result = {
        "benchmark": "adaptive_sweep",
        "machine": args.machine,
        "date": args.date,
        "command": shlex.join(["python", "benchmarks/adaptive_sweep.py", *sys.argv[1:]]),
        "env": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "default")},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "settings": {
            "records": str(args.records),
            "experts": m,
            "ks": f"1-{m}",
            "designs": args.designs,
            "budgets": args.budgets,
            "balanced_per_k": args.balanced_per_k,
            "prior_budgets": args.prior_budgets,
            "prior_balanced_per_k": args.prior_balanced_per_k,
            "prior_kinds": args.prior_kinds,
            "adaptive_start_with_prior": {
                kind: start_counts(m, list(range(1, m + 1)), FEATURES[kind])
                for kind in args.prior_kinds
            },
            "curvature_sample": CURVATURE_SAMPLE,
            "reference_per_k": args.reference_per_k,
            "adaptive_start": start_counts(m, list(range(1, m + 1))),
            "picks_per_round": 1,
            "level": args.level,
            "draws": args.draws,
            "curve": "free",
            "top_share": TOP_SHARE,
            "settled": {
                "p_best": P_BEST_SETTLED,
                "curve_half_width_of_fall": CURVE_SETTLED,
                "mean_score": SCORE_SETTLED,
            },
            "r2_targets": R2_TARGET,
            "coverage_band": COVERAGE_BAND,
            "r2_tolerance": R2_TOLERANCE,
        },
        "designs": rows,
        "verdicts": verdicts(rows, args.reference_per_k),
        "seconds": time.perf_counter() - start,
    }
    name = f"adaptive_sweep_{'cpu' if 'CPU' in args.machine else 'gpu'}_{args.date}"
    save_results(args.out_dir, name, result, render(result))
    print(render(result))


def render(result: dict) -> str:
    s = result["settings"]
    start = ", ".join(f"k={k}: {n}" for k, n in s["adaptive_start"].items())
    prior_starts = "; ".join(
        f"with the {kind} prior from {sum(counts.values())}: "
        + ", ".join(f"k={k}: {n}" for k, n in counts.items())
        for kind, counts in s["adaptive_start_with_prior"].items()
    )
    lines = [
        "# adaptive_sweep: accuracy per merge, adaptive against balanced designs",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Command: "
        f"`OPENBLAS_NUM_THREADS={result['env']['OPENBLAS_NUM_THREADS']} {result['command']}`. "
        f"Python {result['python']}, numpy {result['numpy']}, scipy {result['scipy']}. "
        f"{result['seconds']:.0f} s in all.",
        "",
        f"Table: `{s['records']}`, the demo pool ({s['experts']} experts, k = {s['ks']}) with "
        "every subset merged; each method's cross-domain (macro) curve. Each design is drawn "
        f"with {s['designs']} seeds. Balanced: `per_k` subsets per k (all of a size with fewer). "
        "Adaptive: `hf_mergelaw.adaptive.next_round`, what `sweep_pool` calls, one pick per "
        f"round, merges looked up in the table; it starts from {sum(s['adaptive_start'].values())} "
        f"merges ({start}; {prior_starts}) and stops at the budget or when settled (p_best >= "
        f"{s['settled']['p_best']} at every size and pool-curve half-widths <= "
        f"{s['settled']['curve_half_width_of_fall']:.0%} of the curve's fall, or the best next "
        f"merge removing under {s['settled']['mean_score']:.0%} of the answers' variance on "
        "average). The pool model (f(k) free) is scored on every subset the design did not merge: "
        f"R^2 of the within-k deviations, coverage of the {s['level']:.0%} intervals, 'best in "
        "top 5%': the share of (seed, k = 2..M-1) whose chosen best subset beats all but under 5% "
        f"of its size's measured CEs (select, top 1, {s['draws']} draws); the pool curve E[L | k] "
        "against the mean of every subset of each size (largest error over k, coverage of its "
        "intervals).",
        "",
        "| method | design | merges mean (max) | R^2 within k mean (min..max) | coverage mean "
        "(min..max) | best in top 5% | exact best | worst share | curve max error mean | "
        "curve coverage | adaptive stops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["designs"]:
        stops = ", ".join(f"{why} {n}" for why, n in r.get("stops", {}).items()) or "-"
        lines.append(
            f"| {r['method']} | {r['design']} | {r['merges_mean']:.1f} ({r['merges_max']}) | "
            f"{r['r2_within_k_mean']:.4f} ({r['r2_within_k_min']:.4f}..{r['r2_within_k_max']:.4f})"
            f" | {r['coverage_mean']:.3f} ({r['coverage_min']:.2f}..{r['coverage_max']:.2f}) | "
            f"{r['best_in_top_share']:.2f} | {r['best_exact']:.2f} | {r['best_share_worst']:.3f} "
            f"| {r['curve_max_error_mean']:.4f} | {r['curve_coverage_mean']:.2f} | {stops} |"
        )
    costs = {
        (r["method"], r["prior"]): (r["prior_seconds"], r["prior_merge_eval_s"])
        for r in result["designs"]
        if r["prior"]
    }
    if costs:
        lines += [
            "",
            "Cost of the priors on this machine (computed once per method before the first "
            f"merge; the curvature from {s['curvature_sample']:g} of each domain's sequences; "
            "float32 pool), against one merge-and-evaluate step timed right after it (the mean "
            "over the experts alone): "
            + "; ".join(
                f"{method} {prior} {seconds:.1f} s = {seconds / step:.1f} steps of {step:.2f} s"
                for (method, prior), (seconds, step) in costs.items()
            )
            + ".",
        ]
    lines += [
        "",
        "## The same designs on each domain's curve (mean over the domains)",
        "",
        "| method | design | R^2 within k mean | coverage mean | best in top 5% | exact best |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["designs"]:
        d = r["domains"]
        lines.append(
            f"| {r['method']} | {r['design']} | {d['r2_within_k_mean']:.4f} | "
            f"{d['coverage_mean']:.3f} | {d['best_in_top_share']:.2f} | {d['best_exact']:.2f} |"
        )
    lines += [
        "",
        "## Verdict: merges the adaptive design needs",
        "",
        f"Against the reference balanced design: R^2 within k mean at least the reference's minus "
        f"{s['r2_tolerance']}, coverage mean in {s['coverage_band'][0]:.0%}-"
        f"{s['coverage_band'][1]:.0%}, best-in-top-5% share at least the reference's, pool-curve "
        "error at most the reference's. The issue's targets: R^2 within k >= "
        + ", ".join(f"{m} {t}" for m, t in s["r2_targets"].items())
        + ", coverage in the band, best in the top 5% at every k. Merges: the largest over "
        "seeds at the first budget tried that meets it ('-': none of the budgets tried).",
        "",
        "| method | prior (an adaptive sweep's?) | reference (merges) | half | R^2 | coverage | "
        "best in top 5% | pool curve | issue's targets: adaptive | issue's targets: balanced |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in result["verdicts"]:
        first = v["adaptive_merges_to_match"]

        def cell(value: int | None) -> str:
            return "-" if value is None else str(value)

        lines.append(
            f"| {v['method']} | {v['prior']} ({'yes' if v['sweep_uses_prior'] else 'no'}) | "
            f"{v['reference']} ({v['reference_merges']}) | "
            f"{v['half']:g} | "
            + " | ".join(cell(first[name]) for name in first)
            + f" | {cell(v['adaptive_merges_to_targets'])} | "
            f"{cell(v['balanced_merges_to_targets'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
