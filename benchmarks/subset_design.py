"""How far a sampled cell's mean CE lands from the all-subsets mean: uniform, paper, balanced draws.

Input: records of a sweep that merged every subset (e.g. `hf-mergelaw demo --subsets all`), so
each (method, k) cell's mean over all C(M, k) subsets is known exactly. For each per-k count and
k, many seeded designs of each strategy are drawn from those records, and the RMS error of the
drawn cell mean against the all-subsets mean is reported, for the cross-domain CE and each
domain's in-domain CE. Strategies: `uniform`, `permutations` (the paper's Algorithm 1: prefixes of
diverse permutations, duplicates removed, so it may merge fewer than per_k) and `balanced`.

Run from the repository root:
  hf-mergelaw demo --subsets all -o demo-all
  python benchmarks/subset_design.py demo-all/records.jsonl --machine "2-core CPU CI machine"
writes benchmarks/results/subset_design_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from collections import defaultdict
from functools import cache
from pathlib import Path

import numpy as np
from results_io import save_results

from hf_mergelaw.subsets import sample_subsets

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("uniform", "permutations", "balanced")


def load_cells(path: Path) -> tuple[list[str], dict[tuple[str, str], dict[tuple[int, ...], float]]]:
    """Experts and ``{(method, curve): {subset: ce}}``; curve is "macro" or a domain name."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    experts = sorted({name for row in rows for name in row["subset"]})
    cells: dict[tuple[str, str], dict[tuple[int, ...], float]] = defaultdict(dict)
    for row in rows:
        subset = tuple(sorted(experts.index(name) for name in row["subset"]))
        cells[(row["method"], "macro")][subset] = row["ce"]
        for domain, scored in (row.get("per_domain") or {}).items():
            cells[(row["method"], domain)][subset] = scored["ce"]
    for (method, curve), by_subset in cells.items():
        for k in range(1, len(experts) + 1):
            if sum(len(s) == k for s in by_subset) != math.comb(len(experts), k):
                raise SystemExit(
                    f"{path}: {method}/{curve} lacks some subsets of size {k}; this study needs "
                    "a sweep of every subset (hf-mergelaw demo --subsets all)"
                )
    return experts, cells


# Every curve of a sweep sees the same designs; the paper's permutations are slow to draw.
design = cache(sample_subsets)


def rms_errors(
    by_subset: dict[tuple[int, ...], float], m: int, k: int, per_k: int, draws: int
) -> dict[str, float]:
    exact = np.mean([ce for s, ce in by_subset.items() if len(s) == k])
    out = {}
    for strategy in STRATEGIES:
        errors = [
            np.mean([by_subset[s] for s in design(m, k, strategy=strategy, per_k=per_k, seed=seed)])
            - exact
            for seed in range(draws)
        ]
        out[strategy] = float(np.sqrt(np.mean(np.square(errors))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("--per-k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--machine", default="CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    experts, cells = load_cells(args.records)
    m = len(experts)
    rows = []
    for (method, curve), by_subset in sorted(cells.items()):
        for per_k in args.per_k:
            for k in range(2, m - 1):
                if math.comb(m, k) <= per_k:
                    continue
                errors = rms_errors(by_subset, m, k, per_k, args.draws)
                rows.append(
                    {
                        "method": method,
                        "curve": curve,
                        "per_k": per_k,
                        "k": k,
                        "exact_balance": per_k * k % m == 0,
                        **errors,
                    }
                )
    ratio = np.array([r["uniform"] / r["balanced"] for r in rows])
    exact = np.array([r["exact_balance"] for r in rows])
    result = {
        "benchmark": "subset_design",
        "machine": args.machine,
        "date": args.date,
        "command": shlex.join(["python", "benchmarks/subset_design.py", *sys.argv[1:]]),
        "experts": m,
        "draws": args.draws,
        "median_rms_ratio_exact": float(np.median(ratio[exact])),
        "median_rms_ratio_inexact": float(np.median(ratio[~exact])) if (~exact).any() else None,
        "rows": rows,
    }
    save_results(args.out_dir, f"subset_design_{args.date}", result, render(result))
    print(render(result))


def render(result: dict) -> str:
    lines = [
        "# subset_design: sampled cell means against the all-subsets means",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Command: `{result['command']}`",
        "",
        f"{result['experts']} experts; {result['draws']} seeded designs per cell and strategy. "
        "RMS error of the drawn cell mean (nats) by strategy, and the uniform / balanced ratio. "
        f"Median ratio: {result['median_rms_ratio_exact']:.1f}x where per_k * k is a multiple "
        "of the pool (exact balance)"
        + (
            f", {result['median_rms_ratio_inexact']:.1f}x elsewhere (counts within one)."
            if result["median_rms_ratio_inexact"] is not None
            else "."
        ),
        "",
        "| method | curve | per_k | k | exact balance | uniform RMS | paper permutations RMS "
        "| balanced RMS | uniform / balanced |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['curve']} | {r['per_k']} | {r['k']} | "
            f"{'yes' if r['exact_balance'] else 'no'} | {r['uniform']:.4f} | "
            f"{r['permutations']:.4f} | {r['balanced']:.4f} | {r['uniform'] / r['balanced']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
