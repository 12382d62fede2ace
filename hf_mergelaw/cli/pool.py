"""``hf-mergelaw pool fit | predict | select | plot``: the pool model on a sweep's records.

    hf-mergelaw pool fit results.jsonl --by method,domain -o pool.json
    hf-mergelaw pool predict pool.json --subset code,math --subset bio,code,math --json
    hf-mergelaw pool predict pool.json --all --json          # every subset, pools up to 12
    hf-mergelaw pool select pool.json --k 3 --top 5 --json    # without --k: every size, overall
    hf-mergelaw pool plot pool.json -o figures
    hf-mergelaw pool geometry sweep.yml --calibrate 0 -o pool.json    # from curvature, no merge

JSON goes to stdout with ``--json`` (a table otherwise) and to ``-o`` atomically; ``pool plot``
writes three PNGs per group into its folder. Handlers import the model only when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arguments
from .output import add_json_options, emit, fmt, group_label

if TYPE_CHECKING:
    from ..pool_model import Hyper, PoolModel, PoolReport, Selection

# `--all` lists 2^M - 1 subsets per group; beyond this pool size that is no longer a table.
MAX_ALL_EXPERTS = 12
_SHOWN_PAIRS = 3
# Significant digits of CEs in tables: subsets of one size differ in the fourth.
_DIGITS = 6


def register(subparsers: Any) -> None:
    """Add ``pool`` and its subcommands to the ``hf-mergelaw`` parser."""
    parser = subparsers.add_parser(
        "pool",
        help="the pool model: predict any subset's CE, pick the experts to merge",
        description="Fit L(S) = f(k) + (1/k) sum beta_i + (1/k^2) sum gamma_ij (docs/law.md "
        "section 3) to a sweep's records, then predict subsets, select the best ones and plot "
        "the experts' effects and interactions.",
    )
    commands = parser.add_subparsers(dest="pool_command", metavar="SUBCOMMAND", required=True)
    _add_fit(commands)
    _add_predict(commands)
    _add_select(commands)
    _add_plot(commands)
    _add_geometry(commands)


def _add_group(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group", type=arguments.group, help="only pools of this group, e.g. method=ties"
    )


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=arguments.level, help="interval coverage (default: the fit's)")
    _add_group(p)
    add_json_options(p)


def _pools(args: argparse.Namespace) -> list[PoolModel]:
    from ..pool_model import PoolReport

    report = PoolReport.load(args.pool_file)
    return report.select(args.group) if args.group else report.pools


# --- fit ------------------------------------------------------------------------------------


def _add_fit(commands: Any) -> None:
    p = commands.add_parser(
        "fit",
        help="fit the pool model to sweep records",
        description="Fit a pool model per group of a sweep's records (its .jsonl; each "
        "record's per-domain CEs become the in-domain groups beside the cross-domain 'macro' "
        "one). beta and gamma are shrunk toward the exchangeable model by prior scales chosen "
        "by marginal likelihood.",
    )
    p.add_argument("records", help="the sweep's records file (.jsonl)")
    p.add_argument(
        "--by",
        type=arguments.names,
        default=["method", "domain"],
        help="grouping fields (default method,domain; add N for records of several base sizes)",
    )
    p.add_argument(
        "--curve",
        choices=("free", "law"),
        default="free",
        help="f(k): a free level per measured k (default), or the per-size law L_inf + A/(k+b), "
        "which also predicts sizes the records did not measure (flagged as extrapolated)",
    )
    p.add_argument(
        "--experts",
        type=arguments.names,
        help="the pool, comma-separated (default: every expert the records merge); records "
        "naming anyone else are refused",
    )
    p.add_argument(
        "--level", type=arguments.level, default=0.9, help="interval coverage (default 0.9)"
    )
    p.add_argument(
        "--no-prior",
        action="store_true",
        help="ignore the priors an adaptive sweep kept beside the records (RECORDS stem + "
        ".priors.json; by default each method's groups are fitted with its prior, as the "
        "sweep fitted them)",
    )
    p.add_argument(
        "--prior",
        choices=("weights", "curvature"),
        help="fit each method with this prior, computed from the pool of --sweep (weights: the "
        "Gram of the experts' vectors, no forward pass; curvature: the loss's second-order "
        "terms, from an eighth of the eval sequences); replaces a kept one",
    )
    p.add_argument(
        "--sweep", metavar="SWEEP.yml", help="the sweep YAML whose pool the records merged"
    )
    add_json_options(p, "the pool file (JSON)")
    p.set_defaults(handler=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from ..errors import CommandError
    from ..pool_model import fit_pools
    from ..pool_model.prior import kept_priors

    if (args.prior is None) != (args.sweep is None):
        raise CommandError(
            "--prior and --sweep go together: the prior is computed from the pool of the sweep "
            "YAML that produced the records (e.g. --prior weights --sweep sweep.yml)."
        )
    if args.prior is not None and args.no_prior:
        raise CommandError("--prior and --no-prior contradict each other; give one.")
    priors = {} if args.no_prior else kept_priors(Path(args.records))
    if args.prior is not None:
        from ..geometry import config_priors
        from ..sweep_config import load_sweep_config

        priors = config_priors(load_sweep_config(args.sweep), args.prior)
    report = fit_pools(
        args.records,
        by=args.by,
        curve=args.curve,
        level=args.level,
        experts=args.experts,
        priors=priors,
    )
    payload = report.to_dict()
    emit(args, payload, _fit_table(report, payload))
    return 0


def _weight(hyper: Hyper) -> str:
    """A member's weight at size k (:func:`~..pool_model.design.member_weight`)."""
    return "1/k" if hyper.overlap == 1.0 else f"1/(1 + {fmt(hyper.overlap, 2)} (k-1))"


def _fit_table(report: PoolReport, payload: dict[str, Any]) -> str:
    lines = []
    for model, data in zip(report.pools, payload["pools"], strict=True):
        hyper, loo = model.hyper, data["leave_one_out"]
        lines.append(
            f"== {group_label(model.group)}: {model.m} experts, {model.n_records} merges, "
            f"f(k) {model.curve.kind}"
            + (f" (b = {model.curve.b:g})" if model.curve.kind == "law" else "")
        )
        lines.append(
            f"   prior sd: beta {fmt(hyper.tau_beta)}, gamma {fmt(hyper.tau_gamma)}; misfit sd "
            f"{fmt(hyper.sigma)} k^{fmt(-hyper.rho / 2, 2)}; member weight {_weight(hyper)}; "
            "each merge left out: R^2 within k "
            f"{fmt(loo['r2_within_k'])}, {model.level:.0%} intervals cover "
            f"{fmt(loo['coverage'], 3)}"
        )
        if "prior" in model.source:
            scales = ", ".join(f"{k} x{fmt(v)}" for k, v in model.source["prior"]["scales"].items())
            lines.append(f"   {model.source['prior']['kind']} prior: {scales}")
        interval = model.beta_interval()
        pct = f"{model.level:.0%}"
        for name, value in sorted(model.beta.items(), key=lambda item: item[1]):
            lo, hi = interval[name]
            lines.append(f"   beta {name:<20} {value:>+10.4g}  {pct} [{lo:+.4g}, {hi:+.4g}]")
        lines += _pair_lines(model)
        lines.append(f"   {'k':>3} {'E[L|k]':>9} {'lo':>9} {'hi':>9} {'spread':>9}")
        for point in data["pool_curve"]:
            lines.append(
                f"   {point['k']:>3} {fmt(point['mean'], _DIGITS):>9} "
                f"{fmt(point['lo'], _DIGITS):>9} {fmt(point['hi'], _DIGITS):>9} "
                f"{fmt(point['spread']):>9}" + ("  (extrapolated)" if point["extrapolated"] else "")
            )
    return "\n".join(lines)


def _pair_lines(model: PoolModel) -> list[str]:
    gamma = model.gamma_matrix()
    i, j = zip(*((a, b) for a in range(model.m) for b in range(a + 1, model.m)), strict=True)
    values = gamma[list(i), list(j)]
    order = sorted(range(len(values)), key=lambda n: values[n])
    shown = [*order[:_SHOWN_PAIRS], *order[-_SHOWN_PAIRS:][::-1]]
    lines = []
    for n in dict.fromkeys(shown):
        kind = "synergy" if values[n] < 0 else "conflict"
        pair = f"{model.experts[i[n]]} + {model.experts[j[n]]}"
        lines.append(f"   gamma {pair:<30} {values[n]:>+10.4g}  ({kind})")
    return lines


# --- predict --------------------------------------------------------------------------------


def _add_predict(commands: Any) -> None:
    p = commands.add_parser(
        "predict",
        help="predicted CE of subsets, merged or not",
        description="Predicted CE of each subset with an interval for what a merge of it "
        "measures (the model's uncertainty and one merge's misfit).",
    )
    p.add_argument("pool_file", metavar="POOL.json")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--subset",
        action="append",
        type=arguments.names,
        help="comma-separated experts, e.g. code,math; repeatable",
    )
    which.add_argument(
        "--all",
        action="store_true",
        help=f"every subset of every pool (pools up to {MAX_ALL_EXPERTS} experts)",
    )
    _add_outputs(p)
    p.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    rows = []
    for model in _pools(args):
        rows += _predictions(model, args.subset, args.level)
    header = ("group", "subset", "k", "mean", "lo", "hi", "measured")
    lines = [f"{header[0]:<28} {header[1]:<36}" + "".join(f" {h:>9}" for h in header[2:])]
    for row in rows:
        values = [str(row["k"]), *(fmt(row[key], _DIGITS) for key in header[3:])]
        flag = "  (extrapolated)" if row["extrapolated"] else ""
        lines.append(
            f"{group_label(row['group']):<28} {','.join(row['subset']):<36}"
            + "".join(f" {v:>9}" for v in values)
            + flag
        )
    emit(args, {"predictions": rows}, "\n".join(lines))
    return 0


def _predictions(
    model: PoolModel, subsets: Sequence[Sequence[str]] | None, level: float | None
) -> list[dict[str, Any]]:
    from ..errors import CommandError
    from ..pool_model.search import all_members

    if subsets is not None:
        members = model.members_of(subsets)
    else:
        if model.m > MAX_ALL_EXPERTS:
            raise CommandError(
                f"--all lists every subset of pools up to {MAX_ALL_EXPERTS} experts; "
                f"{model.label()} has {model.m}. Name subsets with --subset, or rank them with "
                "`hf-mergelaw pool select`."
            )
        sizes = [k for k in range(1, model.m + 1) if model.curve.covers(k)]
        skipped = sorted(set(range(1, model.m + 1)) - set(sizes))
        if skipped:
            print(
                f"warning: {model.label()}: k = {', '.join(map(str, skipped))} not measured; a "
                "free f(k) does not predict them (fit --curve law to extrapolate)",
                file=sys.stderr,
            )
        members = np.concatenate([all_members(model.m, k) for k in sizes])
    prediction = model.predict(members, level)
    measured = {
        row.tobytes(): float(ce)
        for row, ce in zip(model.records.members, model.records.ce, strict=True)
    }
    names = model.experts
    return [
        {
            "group": dict(model.group),
            "subset": [names[i] for i in range(model.m) if row[i]],
            "k": int(row.sum()),
            "mean": float(prediction.mean[n]),
            "lo": float(prediction.lo[n]),
            "hi": float(prediction.hi[n]),
            "sd": float(prediction.sd[n]),
            "extrapolated": bool(prediction.extrapolated[n]),
            "measured": measured.get(row.tobytes()),
        }
        for n, row in enumerate(prediction.members)
    ]


# --- select ---------------------------------------------------------------------------------


def _add_select(commands: Any) -> None:
    p = commands.add_parser(
        "select",
        help="best subsets of each size and overall, p_best, greedy order",
        description="The best subsets of a size (exact enumeration while C(M, k) <= 5000, a "
        "tested swap search beyond) with intervals, the probability that each is the best "
        "(posterior draws), and the greedy order in which to add experts. Subsets already "
        "merged count at their measured CE.",
    )
    p.add_argument("pool_file", metavar="POOL.json")
    p.add_argument(
        "--k",
        type=arguments.k_values,
        help="sizes, e.g. 3 or 2-5 (default: every size, and the best overall)",
    )
    p.add_argument(
        "--top",
        type=arguments.count(1, "--top", 100),
        default=1,
        help="subsets reported per size (default 1)",
    )
    p.add_argument(
        "--draws",
        type=arguments.count(10, "--draws", 100_000),
        default=1000,
        help="posterior draws behind p_best (default 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and the search")
    _add_outputs(p)
    p.set_defaults(handler=run_select)


def run_select(args: argparse.Namespace) -> int:
    from ..pool_model import greedy_order, select

    selections: list[Selection] = []
    greedy, caveats = [], []
    for model in _pools(args):
        selections += select(
            model, args.k, top=args.top, draws=args.draws, seed=args.seed, level=args.level
        )
        greedy.append(greedy_order(model, args.level).to_dict())
        caveats += _caveats(model)
    payload = {
        "selections": [s.to_dict() for s in selections],
        "greedy": greedy,
        "warnings": caveats,
    }
    table = _select_table(selections, greedy)
    emit(args, payload, "\n".join([table, *(f"warning: {c}" for c in caveats)]))
    return 0


def _caveats(model: PoolModel) -> list[str]:
    """What an answer of a geometry model rests on: its note unless calibrated, its warnings."""
    source = model.source
    if source.get("kind") != "geometry":
        return []
    uncalibrated = [] if model.has_intervals else [f"{model.label()}: {source['note']}"]
    return uncalibrated + model.warnings


def _select_table(selections: Sequence[Selection], greedy: list[dict[str, Any]]) -> str:
    lines = []
    current = None
    for s in selections:
        if s.group != current:
            current = s.group
            lines.append(f"== {group_label(s.group)}")
            lines.append(
                f"   {'scope':<8} {'k':>3} {'rank':>4} {'mean':>9} {'lo':>9} {'hi':>9} "
                f"{'p_best':>7}  subset"
            )
        flag = " (merged: measured CE)" if s.merged else ""
        flag += " (extrapolated)" if s.extrapolated else ""
        lines.append(
            f"   {s.scope:<8} {s.k:>3} {s.rank:>4} {fmt(s.mean, _DIGITS):>9} "
            f"{fmt(s.lo, _DIGITS):>9} {fmt(s.hi, _DIGITS):>9} {s.p_best:>7.3f}  "
            f"{','.join(s.subset)}{flag}"
        )
    for path in greedy:
        lines.append(f"== greedy order, {group_label(path['group'])}: {' > '.join(path['order'])}")
        for step in path["steps"]:
            mean = step["mean"]
            shown = "-" if mean is None else fmt(mean, _DIGITS)
            lines.append(f"   k={step['k']:<3} +{step['added']:<20} {shown}")
    return "\n".join(lines)


# --- plot -----------------------------------------------------------------------------------


def _add_plot(commands: Any) -> None:
    p = commands.add_parser(
        "plot",
        help="synergy heatmap, expert effects, predicted vs measured",
        description="Write <group>-synergy.png (gamma), <group>-effects.png (beta with "
        "intervals) and <group>-predicted.png (each merge predicted with it left out of the "
        "fit, against its measured CE) for each pool.",
    )
    p.add_argument("pool_file", metavar="POOL.json")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNGs")
    _add_group(p)
    p.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from ..pool_model.plotting import plot_pool

    for model in _pools(args):
        for path in plot_pool(model, args.output):
            print(f"wrote {path}")
    return 0


# --- geometry -------------------------------------------------------------------------------

GEOMETRY_EPILOG = """\
Around the base, a merge's loss is to second order L0 + (1/k) sum g_i + (1/(2k^2)) sum Q_ij
with g_i = grad L . u_i and Q_ij = u_i' H u_j for the vectors u_i each expert adds (its task
vector as the method merges it). One gradient and M curvature-vector products on the YAML's
eval data give them per domain, so every subset's CE, the best subsets and the pool curve come
with no merge. That prediction ignores everything beyond second order (and, for TIES and
DARE-TIES, the sign election), so alone it has no interval. --calibrate N merges N subsets per
method (every expert alone first, then the full pool, pairs and half-pool merges), records them
in the sweep's output like a sweep's own (a later sweep skips them), and fits the part the
expansion misses: a level L_inf + A/(k+b) and shrunk corrections of every expert and pair. The
pool file is the one `pool fit` writes: `pool predict`, `select` and `plot` read it.
"""


def _add_geometry(commands: Any) -> None:
    p = commands.add_parser(
        "geometry",
        help="the pool model from the loss's curvature at the base: no merge, or a few",
        description="Predict every subset's CE of a sweep YAML's pool from the gradient and "
        "curvature of the eval loss at the base, optionally calibrated on a few merges.",
        epilog=GEOMETRY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="SWEEP.yml")
    p.add_argument(
        "--calibrate",
        type=arguments.count(0, "--calibrate"),
        default=None,
        help="subsets merged per method to calibrate on: 0 (the geometry alone) or at least "
        "M + 2 (default 2M: every expert alone, the full pool, then pairs and half-pool merges)",
    )
    p.add_argument(
        "--curvature",
        choices=("hessian", "ggn"),
        default="hessian",
        help="exact Hessian-vector products (default) or the Gauss-Newton matrix (positive "
        "semi-definite, about half the time; ignores the curvature of the network itself)",
    )
    p.add_argument(
        "--curvature-sample",
        type=arguments.share,
        default=1.0,
        help="share of each domain's sequences the curvature is taken from (default 1: all; "
        "the loss and gradient always use all): its cost falls in proportion",
    )
    p.add_argument(
        "--level", type=arguments.level, default=0.9, help="interval coverage (default 0.9)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_options(p, "the pool file (JSON)")
    p.set_defaults(handler=run_geometry)


def run_geometry(args: argparse.Namespace) -> int:
    from ..geometry import pool_geometry
    from ..sweep_config import load_sweep_config

    config = load_sweep_config(args.config)
    calibration = 2 * len(config.experts) if args.calibrate is None else args.calibrate
    run = pool_geometry(
        config,
        curvature=args.curvature,
        curvature_sample=args.curvature_sample,
        calibration=calibration,
        level=args.level,
        progress=not args.no_progress,
    )
    payload = {
        **run.report.to_dict(),
        "cost": {
            "geometry_s": run.geometry_s,
            "calibration_merges": run.calibration_merges,
            "merge_eval_s": run.merge_eval_s,
        },
    }
    emit(args, payload, _geometry_table(run.report, payload))
    for model in run.report.pools:
        for warning in model.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _geometry_table(report: PoolReport, payload: dict[str, Any]) -> str:
    lines = []
    for model, data in zip(report.pools, payload["pools"], strict=True):
        source, law = model.source, data["law"]
        sample = source.get("curvature_sample", 1.0)
        how = source["curvature"] + ("" if sample == 1 else f" from {sample:.0%} of the sequences")
        lines.append(f"== {group_label(model.group)}: {model.m} experts, {how}")
        lines.append(f"   {source['note']}")
        calibration = source.get("calibration")
        if calibration:
            shifts = ", ".join(f"k={k}: {v:+.4f}" for k, v in calibration["shift"].items())
            lines.append(
                f"   calibration: {calibration['merges']} merges; measured minus predicted "
                f"{shifts}; each merge left out: rmse {fmt(calibration['loo_rmse'])}, "
                f"{model.level:.0%} intervals cover {fmt(calibration['loo_coverage'], 3)}"
            )
        lines.append(
            f"   law of the pool curve: L_inf {fmt(law['L_inf'], _DIGITS)}, A "
            f"{fmt(law['A'])}, b {fmt(law['b'], 3)}"
        )
        lines.append(f"   {'k':>3} {'E[L|k]':>9} {'lo':>9} {'hi':>9} {'spread':>9}")
        for point in data["pool_curve"]:
            lines.append(
                f"   {point['k']:>3} {fmt(point['mean'], _DIGITS):>9} "
                f"{fmt(point['lo'], _DIGITS):>9} {fmt(point['hi'], _DIGITS):>9} "
                f"{fmt(point['spread']):>9}"
            )
    cost = payload["cost"]
    spent = f"geometry {cost['geometry_s']:.1f} s"
    if cost["calibration_merges"]:
        spent += (
            f"; {cost['calibration_merges']} calibration merges per method at "
            f"{cost['merge_eval_s']:.2f} s per merge-and-evaluate"
        )
    lines.append(spent)
    return "\n".join(lines)
