"""``fit``, ``predict``, ``plan`` and ``plot`` subcommands of ``hf-mergelaw``.

Outputs are written atomically (temp file + rename), so a failed command never leaves a partial
file. Human-readable tables go to stdout unless ``--json``; warnings (dropped rows) to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LawError
from ..files import read_json
from ..law.fit_result import FitReport, FitResult
from ..law.fitting import LOSSES, TARGETS, WEIGHTS, fit_sweep
from ..law.paper import PAPER_SIZES
from ..law.planning import CostModel, Plan, Tradeoff, plan, size_vs_experts
from ..law.records import describe_dropped, load_records
from . import arguments
from .output import add_json_options, emit, fmt, group_label

FORM_HELP = (
    "law to fit: per-size (L_inf + A/(k+b), one fit per N), joint (L_star + B N^-beta + "
    "A0 N^-gamma/(k+b)), variance (same shape, fitted to the subset variance), "
    "variance-per-size, free-exponent (L_inf + A/(k+b)^delta), ties-per-size (the paper's TIES "
    "curve: L_inf + A/(k+b) + D k/(k+q)), or a formula over N and k such "
    "as 'L = c + a/(k+b)**d' whose parameters are declared with --param"
)
MAX_K_MAX = 1000  # the gain curve and the trade-off grid run over 1..k_max
PARAM_HELP = (
    "NAME=LO:HI[:START] bounds (and start) of a parameter; leave LO or HI empty for no bound "
    "(a=0: means a >= 0). Declares formula parameters; overrides built-in bounds. Repeatable"
)


def register(subparsers: Any) -> None:
    """Add the law subcommands to the ``hf-mergelaw`` parser."""
    _add_fit(subparsers)
    _add_predict(subparsers)
    _add_plan(subparsers)
    _add_plot(subparsers)


# --- fit ------------------------------------------------------------------------------------


def _fits(args: argparse.Namespace) -> list[FitResult]:
    report = FitReport.load(args.fit_file)
    return report.select(args.group) if args.group else report.fits


def _add_fit(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit a law to sweep records",
        description="Fit a merging scaling law to sweep records (JSON lines, JSON or CSV; one "
        "record per merged model with k, ce and optional N in billions, method, domain, subset).",
    )
    p.add_argument("records", help="records file (.jsonl, .json or .csv)")
    p.add_argument("--form", default="joint", help=FORM_HELP)
    p.add_argument("--param", action="append", type=arguments.param, default=[], help=PARAM_HELP)
    p.add_argument(
        "--by",
        type=arguments.names,
        default=[],
        help="comma-separated grouping fields, e.g. method,domain",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="k",
        help="point weights (default k: sigma = 1/sqrt(k))",
    )
    p.add_argument("--loss", choices=LOSSES, default="linear", help="least squares or robust Huber")
    p.add_argument(
        "--bootstrap",
        type=arguments.count(0, "--bootstrap", 100_000),
        default=0,
        metavar="N",
        help="bootstrap replicates (subsets resampled within each (N, k) cell; for the "
        "population, plus the shift of a resampled pool of experts)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--level", type=arguments.level, default=0.9, help="interval coverage (default 0.9)"
    )
    p.add_argument(
        "--strict", action="store_true", help="fail on any invalid record instead of dropping it"
    )
    p.add_argument("--no-variance", action="store_true", help="skip the companion variance-law fit")
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="population",
        help="what intervals describe: the population the experts come from (default; what "
        "planning needs) or this pool's own curve (every subset of these experts)",
    )
    p.add_argument(
        "--pool-size",
        type=arguments.count(1, "--pool-size"),
        help="experts in the pool (default: the distinct names in the records' subsets)",
    )
    add_json_options(p, "the fit JSON")
    p.set_defaults(handler=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    records = load_records(args.records, strict=args.strict)
    if records.dropped:
        print(f"warning: {describe_dropped(records)}", file=sys.stderr)
    report = fit_sweep(
        records,
        args.form,
        by=args.by,
        seed=args.seed,
        params=dict(args.param) or None,
        weights=args.weights,
        loss=args.loss,
        bootstrap=args.bootstrap,
        level=args.level,
        variance=not args.no_variance,
        pool_size=args.pool_size,
        target=args.target,
    )
    for failure in report.failed:
        print(f"warning: {failure['error']}", file=sys.stderr)
    emit(args, report.to_dict(), _fit_table(report))
    return 0


def _fit_table(report: FitReport) -> str:
    lines = []
    for fit in report.fits:
        lines.append(
            f"== {group_label(fit.group)}: {fit.form}, {fit.n_points} records in {fit.n_cells} "
            f"cells, R^2 {fit.r2:.4f}, RMSE {fit.rmse:.4g}"
        )
        pct = f"{fit.level:.0%}"
        for name, value in fit.params.items():
            lo, hi = fit.ci[name]
            lines.append(
                f"   {name:<8} {value:>11.5g}  se {fmt(fit.stderr[name]):>9}  "
                f"{pct} CI [{fmt(lo)}, {fmt(hi)}]"
            )
        if fit.variance is not None:
            shown = ", ".join(f"{n}={v:.3g}" for n, v in fit.variance.params.items())
            lines.append(f"   variance law: {shown} (R^2 {fit.variance.r2:.3f})")
        lines += _check_lines(fit)
        lines += [f"   warning: {warning}" for warning in fit.warnings]
        lines += [f"   note: {note}" for note in fit.notes]
    lines += [f"== {group_label(f['group'])}: not fitted: {f['error']}" for f in report.failed]
    if report.dropped:
        lines.append(f"({sum(report.dropped.values())} records dropped: {report.dropped})")
    return "\n".join(lines)


def _check_lines(fit: FitResult) -> list[str]:
    lines = []
    for name in ("leave_out_k", "leave_out_size"):
        check = fit.checks.get(name)
        if check is not None:
            lines.append(
                f"   forecast of {check['held_out']} from the rest: max error "
                f"{check['max_rel_error']:.2%} over {check['cells']} cells"
            )
    test = fit.checks.get("lack_of_fit")
    if test is not None:
        lines.append(
            f"   lack of fit: chi2 {test['chi2']:.3g} on {test['dof']} dof, "
            f"p = {test['p_value']:.3g}"
        )
    if fit.pool_size is not None:
        lines.append(f"   pool: {fit.pool_size} experts")
    return lines


# --- predict --------------------------------------------------------------------------------


def _add_predict(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict loss at (N, k) from a fit",
        description="Mean loss with a CI for the mean curve (lo, hi) and a prediction interval "
        "for one merged model (pi_lo, pi_hi). The PI uses the fitted variance law when the fit "
        "has one, else the residual scatter of the cells scaled as 1/k (pi_source says which).",
    )
    p.add_argument("fit_file", metavar="FIT.json")
    p.add_argument(
        "--N",
        type=arguments.sizes,
        help="sizes in billions, e.g. 72 or 7,72 (default: fitted sizes)",
    )
    p.add_argument(
        "--k",
        type=arguments.k_values,
        default=list(range(1, 10)),
        help="k values, e.g. 1-9 (default) or 1,2,4",
    )
    p.add_argument(
        "--level", type=arguments.level, help="interval coverage (default: the fit's, 0.9)"
    )
    p.add_argument(
        "--group", type=arguments.group, help="only fits of this group, e.g. method=ties"
    )
    add_json_options(p)
    p.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    rows = []
    for fit in _fits(args):
        for size in fit.sizes_for(args.N):
            rows += fit.predict(size, np.array(args.k, float), level=args.level).to_rows(fit.group)
    if not rows:
        raise LawError(
            f"no fit covers N={args.N}: per-size fits predict only their own size; "
            "fit --form joint to extrapolate in N"
        )
    header = ("group", "N", "k", "mean", "lo", "hi", "pi_lo", "pi_hi")
    lines = [_row(header)]
    for r in rows:
        values = [fmt(r[key]) for key in header[1:]]
        lines.append(_row((group_label(r["group"]), *values)))
    table = "\n".join(lines)
    emit(args, {"predictions": rows}, table)
    return 0


def _row(cells: Sequence[str]) -> str:
    return f"{cells[0]:<28}" + "".join(f" {c:>9}" for c in cells[1:])


# --- plan -----------------------------------------------------------------------------------


def _add_plan(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="experts needed, stop rule, k80/k90, three-point recipe, size vs experts",
        description="Planning answers from a per-size or joint fit (docs/law.md section 5), with "
        "intervals over the fit's bootstrap replicates (or Wald draws). --budget and/or "
        "--target-loss on a joint fit also compare base sizes against expert counts under a "
        "cost model (default: the paper's merge times for the group's method).",
    )
    p.add_argument("fit_file", metavar="FIT.json")
    p.add_argument(
        "--target-loss",
        type=arguments.finite,
        help="loss to reach -> k_for_target (null if at/below the floor)",
    )
    p.add_argument(
        "--min-gain",
        type=arguments.positive,
        help="smallest worthwhile gain per added expert -> k_stop",
    )
    p.add_argument("--eps", type=arguments.positive, help="distance to the floor -> k_eps")
    p.add_argument("--N", type=arguments.sizes, help="sizes in billions (default: fitted sizes)")
    p.add_argument(
        "--k-max",
        type=arguments.count(2, "--k-max", MAX_K_MAX),
        default=9,
        help="K of k80/k90, the three-point forecast, the trade-off grid",
    )
    p.add_argument(
        "--budget",
        type=arguments.positive,
        help="cost budget for the size-versus-experts trade-off",
    )
    p.add_argument(
        "--cost-model",
        default="merge-time",
        help="merge-time[:METHOD] (paper's seconds per merge) or a JSON file "
        '{"base": number | {N: cost}, "per_expert": ..., "unit": "..."}',
    )
    p.add_argument(
        "--sizes",
        type=arguments.sizes,
        default=list(PAPER_SIZES),
        help="candidate sizes for the trade-off (default: the paper's 0.5-72B)",
    )
    p.add_argument("--level", type=arguments.level, help="interval coverage (default: the fit's)")
    p.add_argument("--seed", type=int, default=0, help="seed of Monte Carlo draws")
    p.add_argument("--group", type=arguments.group, help="only fits of this group")
    add_json_options(p)
    p.set_defaults(handler=run_plan)


def _cost_model(spec: str) -> CostModel | None:
    if spec == "merge-time":
        return None
    if spec.startswith("merge-time:"):
        return CostModel.merge_time(spec.split(":", 1)[1])
    path = Path(spec)
    if not path.is_file():
        raise LawError(f"cost model {spec!r}: not merge-time[:METHOD] and no such file")
    data = read_json(path, "cost model")
    try:
        return CostModel.from_dict(data)
    except (AttributeError, TypeError, ValueError) as exc:
        raise LawError(f"cost model {path}: {exc}") from None


def run_plan(args: argparse.Namespace) -> int:
    plans: list[Plan] = []
    tradeoffs: list[Tradeoff] = []
    cost_model = _cost_model(args.cost_model)
    for fit in _fits(args):
        plans += plan(
            fit,
            N=args.N,
            target_loss=args.target_loss,
            eps=args.eps,
            min_gain=args.min_gain,
            k_max=args.k_max,
            level=args.level,
            seed=args.seed,
        )
        wants_tradeoff = args.budget is not None or args.target_loss is not None
        if wants_tradeoff and "N" in fit.law.variables:
            tradeoffs.append(
                size_vs_experts(
                    fit,
                    cost_model,
                    sizes=args.sizes,
                    k_max=args.k_max,
                    target_loss=args.target_loss,
                    budget=args.budget,
                    level=args.level,
                )
            )
    if not plans:
        raise LawError(f"no fit covers N={args.N}; per-size fits plan only for their own size")
    if args.budget is not None and not tradeoffs:
        raise LawError(
            "--budget needs a joint fit (the trade-off extrapolates in N): fit --form joint"
        )
    payload = {
        "plans": [p.to_dict() for p in plans],
        "tradeoffs": [t.to_dict() for t in tradeoffs],
    }
    emit(args, payload, _plan_table(plans, tradeoffs))
    return 0


def _plan_table(plans: Sequence[Plan], tradeoffs: Sequence[Tradeoff]) -> str:
    lines = []
    for p in plans:
        lines.append(f"== {group_label(p.group)} at N={fmt(p.N)} (intervals {p.level:.0%})")
        lines += [f"   {line}" for line in p.describe()]
    for t in tradeoffs:
        lines.append(f"== size vs experts, {group_label(t.group)} (cost in {t.unit})")
        for label, opt in (
            ("cheapest reaching target", t.cheapest),
            ("cheapest with upper bound at target", t.cheapest_confident),
            ("best within budget", t.best_within_budget),
        ):
            if opt is not None:
                lines.append(
                    f"   {label}: N={opt.N:g}B, k={opt.k}: loss {opt.mean:.4g} "
                    f"[{opt.lo:.4g}, {opt.hi:.4g}], cost {opt.cost:.4g}"
                )
        lines += [f"   note: {n}" for n in t.notes]
    return "\n".join(lines)


# --- plot -----------------------------------------------------------------------------------


def _add_plot(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plot",
        help="paper-style figure of a sweep with fitted curves and residuals",
        description="Subset scatter, mean CE versus k per size, fitted curves with the mean-curve "
        "band (shaded) and the single-merge band (dashed), and a residual panel per group. "
        "Without --fit, fits --form (default: joint with 3+ sizes, else per-size).",
    )
    p.add_argument("records", help="records file (.jsonl, .json or .csv)")
    p.add_argument("--fit", dest="fit_file", help="fit JSON from `hf-mergelaw fit`")
    p.add_argument(
        "--by", type=arguments.names, help="grouping fields (default: the fit's, else none)"
    )
    p.add_argument("--form", help="law to fit when no --fit is given")
    p.add_argument("--level", type=arguments.level, default=0.9, help="band coverage (default 0.9)")
    p.add_argument("-o", "--output", required=True, help="image path (.png, .pdf, .svg)")
    p.set_defaults(handler=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from ..law.plotting import plot_sweep

    records = load_records(args.records)
    if records.dropped:
        print(f"warning: {describe_dropped(records)}", file=sys.stderr)
    if args.fit_file:
        report = FitReport.load(args.fit_file)
        by = args.by if args.by is not None else list(report.by)
    else:
        by = args.by or []
        n_sizes = np.unique(records.N[np.isfinite(records.N)]).size
        form = args.form or ("joint" if n_sizes >= 3 else "per-size")
        report = fit_sweep(records, form, by=by)
    plot_sweep(records, report.fits, by=by, level=args.level, path=args.output)
    print(f"wrote {args.output}")
    return 0
