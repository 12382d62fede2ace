"""The demo's text: a markdown report (``report.md``) and the summary printed to the console.

Both are rendered from a :class:`ReportInputs`, so what the console says and what the file says
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hf_mergelaw.law import FitReport, FitResult, Plan
from hf_mergelaw.pool_model import Selection
from hf_mergelaw.record_schema import CROSS_DOMAIN

from .corpus import DOMAINS
from .geometry_check import GeometryCheck
from .pool_check import MethodPool, PoolCheck
from .science import R2_THRESHOLD, ScienceCheck
from .settings import QUICK, TARGET_ABOVE_FLOOR, DemoSettings


@dataclass(frozen=True)
class ReportInputs:
    settings: DemoSettings
    manifest: Mapping[str, Any]  # the pool's pool.json
    pool_built: bool
    pool_dir: str
    base_ce: Mapping[str, float]  # domain -> CE of the base, "macro" included
    own_domain_ce: Mapping[str, float]  # domain -> CE of that domain's expert alone
    fits: FitReport
    plans: Mapping[str, Plan]  # method -> cross-domain plan
    default_target: bool  # the plans' target is the default, 1% above each floor
    check: ScienceCheck
    answers: PoolCheck  # the pool model: held-out check and best subsets
    geometry: GeometryCheck  # the pool model from curvature, before any merge
    n_records: int
    figures: Mapping[str, str]  # name -> file name
    timings: Mapping[str, float]
    threads: int
    load_average: float


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _ce(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fit_rows(fits: Sequence[FitResult]) -> list[tuple[str, str, float, float, float, float, float]]:
    """(method, curve, L_inf, A, b, R², RMSE), cross-domain first."""
    ordered = sorted(fits, key=lambda f: (f.group["domain"] != CROSS_DOMAIN, f.group["method"]))
    return [
        (
            f.group["method"],
            _curve(f),
            f.params["L_inf"],
            f.params["A"],
            f.params["b"],
            f.r2,
            f.rmse,
        )
        for f in ordered
    ]


def warning_lines(fits: Sequence[FitResult]) -> list[str]:
    """Each curve's warnings (parameters a bound decided), as a list under the fit table."""
    lines = [
        f"- {f.group['method']}, {_curve(f)}: {warning}" for f in fits for warning in f.warnings
    ]
    return ["", "Warnings:", "", *lines] if lines else []


def _curve(fit: FitResult) -> str:
    domain = fit.group["domain"]
    return "cross-domain" if domain == CROSS_DOMAIN else domain


def verdict_lines(check: ScienceCheck, settings: DemoSettings) -> list[str]:
    """The verdict, and for each method whose findings do not all show, why (from the data)."""
    if check.passed:
        lines = [f"All findings show for every method (R² ≥ {R2_THRESHOLD})."]
    else:
        lines = ["Not every finding shows:"]
    for method in check.methods:
        notes = method.diagnosis()
        if notes:
            lines.append(f"- {method.method}: " + "; ".join(notes) + ".")
    if settings.name == QUICK.name:
        lines.append(
            "- At the quick size (CI) the pool is too small and too briefly trained to measure "
            "the law; run the full demo."
        )
    noisy = [m for m in check.methods if min(m.in_domain_r2.values()) < R2_THRESHOLD]
    if noisy and settings.sweep.strategy != "all":
        first = noisy[0].by_k[0]
        lines.append(
            "- In-domain fits are noisier than cross-domain ones (lowest in-domain R² "
            + ", ".join(f"{m.method} {min(m.in_domain_r2.values()):.2f}" for m in noisy)
            + f"): one domain's CE varies more across subsets than the macro mean does (sd "
            f"{first.in_domain_sd:.4f} vs {first.sd:.4f} at k=1 for {noisy[0].method}), so its "
            "sampled per-k means carry more noise; `--subsets all` removes it."
        )
    return lines


def _subset(selection: Selection) -> str:
    return ", ".join(selection.subset)


def _selection_ce(selection: Selection) -> str:
    """The CE merging it gives: measured, or predicted with its interval."""
    if selection.merged:
        return f"{selection.mean:.4f} (merged)"
    return f"{selection.mean:.4f} [{selection.lo:.4f}, {selection.hi:.4f}]"


def _held_out_scores(method: MethodPool) -> tuple[str, str]:
    """R² within k and coverage on the held-out merges, '-' when none were held out."""
    if not len(method.held_ce):
        return "-", "-"
    return f"{method.r2_within_k:.3f}", f"{method.coverage:.0%}"


def pool_lines(answers: PoolCheck) -> list[str]:
    """Each method's held-out check and best subset against merging everything (console)."""
    lines = []
    for m in answers.methods:
        r2, covered = _held_out_scores(m)
        best = m.overall
        lines.append(
            f"  {m.method}: fitted on {m.model.n_records} merges, {len(m.held_ce)} held out: "
            f"R^2 within k {r2}, {m.model.level:.0%} intervals cover {covered}; best overall "
            f"{_subset(best)} (k={best.k}) {best.mean:.4f} vs every expert {m.everything:.4f}"
        )
    return lines


def pool_section(inputs: ReportInputs) -> list[str]:
    """The report's pool-model section: the held-out check, the best subsets, the figures."""
    answers, sweep = inputs.answers, inputs.settings.sweep
    held = answers.methods[0]
    m = held.model.m
    if len(held.held_ce):
        ks = ", ".join(map(str, held.held_out_ks))
        held_text = (
            f"then checked on {len(held.held_ce)} subsets per method it was not fitted on: "
            f"{sweep.held_out_per_k} of each k = {ks} (the sizes the sweep left some of "
            "unmerged), drawn with a seed among the unmerged ones and merged apart "
            "(`held_out.jsonl`)"
        )
    else:
        held_text = (
            "with every subset merged nothing is held out, so the check is leave-one-out only"
        )
    out = [
        "## Which experts to merge: the pool model",
        "",
        "Per method, the pool model L(S) = f(k) + w(k) Σ β_i + w(k)² Σ γ_ij (f free per k; "
        "w(k) = 1/(1 + overlap (k - 1)), 1/k for an average, the overlap chosen by evidence "
        "where a disjoint mean such as TIES's weighs each member more; "
        "each expert's effect β and each pair's interaction γ shrunk toward the exchangeable "
        "model by prior scales chosen by marginal likelihood) is fitted to the cross-domain CEs "
        f"of the sweep above, {held_text}. R² is that of the within-k deviations (what the pool "
        "model adds to the law's mean at each k); leave-one-out: each fitted merge predicted "
        "from the others.",
        "",
        f"| method | fitted on | overlap | held out | R² within k (held out) | "
        f"{held.model.level:.0%} intervals cover (held out) | leave-one-out R² / coverage | "
        f"best overall | its CE | merging all {m} | gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in answers.methods:
        r2, covered = _held_out_scores(method)
        loo = method.leave_one_out
        best = method.overall
        out.append(
            f"| {method.method} | {method.model.n_records} | {method.model.overlap:.2f} | "
            f"{len(method.held_ce)} | {r2} | "
            f"{covered} | {loo['r2_within_k']:.3f} / {loo['coverage']:.0%} | {_subset(best)} "
            f"(k={best.k}) | {_selection_ce(best)} | {method.everything:.4f} | "
            f"{method.everything - best.mean:+.4f} |"
        )
    out += [
        "",
        "![pool model: predicted against measured CE of held-out merges](pool_held_out.png)",
        "",
        "The best subset of each size: its measured CE where the sweep merged it, else the "
        f"model's prediction with its {held.model.level:.0%} interval; p_best: the share of "
        "posterior draws in which it is the best of its size.",
    ]
    for method in answers.methods:
        out += [
            "",
            f"**{method.method}**",
            "",
            "| k | best subset | CE | p_best |",
            "|---|---|---|---|",
            *(
                f"| {s.k} | {_subset(s)} | {_selection_ce(s)} | {s.p_best:.2f} |"
                for s in method.best
            ),
        ]
    figures = [
        f"[{name.removeprefix('pool/')}]({file})"
        for name, file in inputs.figures.items()
        if name.startswith("pool/")
    ]
    out += [
        "",
        "Per method in `pool/`: " + ", ".join(figures) + ". `pool.json` holds the model of every "
        "method and domain: `hf-mergelaw pool select pool.json --k 3` and `hf-mergelaw pool "
        "predict pool.json --subset a,b,c` answer from it.",
    ]
    return out


def geometry_section(inputs: ReportInputs) -> list[str]:
    """The report's section on predicting before merging: the geometry model's scores."""
    check = inputs.geometry
    m = check.methods[0].prior.m
    sweep_s = inputs.n_records * check.merge_eval_s
    out = [
        "## Before merging: the pool model from curvature",
        "",
        f"One gradient and {m} Hessian-vector products per method on the eval set at the base "
        f"({check.geometry_s:.1f} s for {len(check.methods)} methods; one merge-and-evaluate "
        f"step of the sweep takes {check.merge_eval_s:.2f} s, so the sweep's "
        f"{inputs.n_records} merges about {sweep_s:.0f} s) give every subset's CE to second "
        "order with no merge (`hf-mergelaw pool geometry`, `geometry.json`). Scored on every "
        "merge the demo measured; 'calibrated': the same model corrected by "
        f"{2 * m} of the sweep's merges (every expert alone, the full pool, pairs and "
        "half-pool merges).",
        "",
        "| method | merges scored | shape R² within k | Spearman within k | level RMSE | floor "
        "(law fitted on the sweep) | calibrated: R² within k | calibrated RMSE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in check.methods:
        s = method.scores()
        out.append(
            f"| {method.method} | {s['merges']} | {s['shape_r2']:.3f} | {s['spearman']:.3f} | "
            f"{s['level_rmse']:.4f} | {s['floor']:.4f} ({s['fitted_floor']:.4f}) | "
            f"{s['calibrated_r2_within_k']:.3f} | {s['calibrated_rmse']:.4f} |"
        )
    figure = inputs.figures.get("geometry_predicted")
    if figure:
        out += ["", f"![zero-merge prediction against the measured merges]({figure})"]
    return out


def console_summary(inputs: ReportInputs) -> str:
    """What the demo prints when done: the fit table, the plan and the science verdict."""
    lines = ["", "Fits of L(k) = L_inf + A/(k+b) (per-size law, weights k):"]
    lines.append(f"  {'method':<12}{'curve':<17}{'L_inf':>8}{'A':>8}{'b':>7}{'R^2':>8}")
    for method, curve, floor, a, b, r2, _ in fit_rows(inputs.fits.fits):
        lines.append(f"  {method:<12}{curve:<17}{floor:>8.4f}{a:>8.4f}{b:>7.3f}{r2:>8.4f}")
    lines += ["", "Plan (cross-domain):"]
    for method, p in inputs.plans.items():
        lines += [f"  {method}:", *(f"    {line}" for line in p.describe())]
    lines += ["", "Science check (cross-domain):"]
    for m in inputs.check.methods:
        first, last = m.spread_points[0], m.spread_points[-1]
        lines.append(
            f"  {m.method}: mean CE falls at every k: {'yes' if m.falls else 'NO'}; "
            f"R^2 {m.r2:.4f} ({'>=' if m.r2 >= R2_THRESHOLD else '<'} {R2_THRESHOLD}); "
            f"sd across subsets {first.sd:.4f} at k=1 -> {last.sd:.4f} at k={last.k} "
            f"({'shrinks' if m.spread_shrinks else 'does NOT shrink'})"
        )
    lines += ["  " + line for line in verdict_lines(inputs.check, inputs.settings)]
    lines += ["", "Pool model (cross-domain):", *pool_lines(inputs.answers)]
    return "\n".join(lines)


def render_report(inputs: ReportInputs) -> str:
    """``report.md``: what was built, the fits, the plan, the science check, figures, timings."""
    manifest = inputs.manifest
    domains = manifest["domains"]
    m = len(domains)
    n_params = manifest["num_parameters"]
    parts = {d.name: d.parts for d in DOMAINS}
    sweep = inputs.settings.sweep
    subsets = (
        "every subset"
        if sweep.strategy == "all"
        else f"up to {sweep.per_k} subsets per k, drawn so that every expert is in equally many "
        "(all of them where a k has fewer)"
    )
    out = [
        "# hf-mergelaw demo: the merging scaling law on a CPU-sized pool",
        "",
        f"{m} experts, one per part of the Python standard library, fine-tuned from one small "
        f"Llama base ({n_params / 1e6:.2f}M parameters, byte-level BPE vocabulary of "
        f"{manifest['vocab_size']}), merged with `average` and `ties_fused` (TIES, density "
        f"{sweep.ties_density:g}, lambda 1) for every k = 1..{m}: {subsets}, "
        f"{inputs.n_records} merged models in all. Every merge is scored on held-out files of "
        "every domain: in-domain CE per domain, cross-domain CE = the macro mean over domains "
        f"(nats/token). Settings: {inputs.settings.describe()}.",
        "",
        "## Science check",
        "",
        "The paper's qualitative findings, measured on the cross-domain curve:",
        "",
        "| method | mean CE falls at every k | fall k=1→M (nats) | s.e. of the per-k means "
        "(uniform-draw bound) | "
        "R² of L_inf + A/(k+b) | b | in-domain R² (min / median) | sd across subsets: "
        "k=1 → largest k with a spread | spread shrinks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in inputs.check.methods:
        r2s = sorted(c.in_domain_r2.values())
        first, last = c.spread_points[0], c.spread_points[-1]
        out.append(
            f"| {c.method} | {_yes(c.falls)} | {c.drop:.4f} | {c.noise:.4f} | {c.r2:.4f} | "
            f"{c.b:.2f} | {r2s[0]:.3f} / {r2s[len(r2s) // 2]:.3f} | {first.sd:.4f} → "
            f"{last.sd:.4f} (k={last.k}) | {_yes(c.spread_shrinks)} |"
        )
    out += ["", *verdict_lines(inputs.check, inputs.settings)]
    out += [
        "",
        "Cross-domain mean CE and sd across subsets by k:",
        "",
        "| k | "
        + " | ".join(f"{c.method} mean | {c.method} sd" for c in inputs.check.methods)
        + " | subsets merged (of C(M,k)) |",
        "|---|" + "---|---|" * len(inputs.check.methods) + "---|",
    ]
    for i, summary in enumerate(inputs.check.methods[0].by_k):
        cells = []
        for c in inputs.check.methods:
            s = c.by_k[i]
            cells.append(f"{s.mean:.4f} | " + ("-" if s.n_subsets < 2 else f"{s.sd:.4f}"))
        out.append(
            f"| {summary.k} | "
            + " | ".join(cells)
            + f" | {summary.n_subsets} of {summary.n_possible} |"
        )
    out += [
        "",
        f"The base alone scores {inputs.base_ce[CROSS_DOMAIN]:.4f} cross-domain.",
        "",
        f"![cross-domain law]({inputs.figures['cross_domain']})",
        "",
        f"![spread across subsets]({inputs.figures['spread']})",
        "",
        "In-domain curves: "
        + ", ".join(
            f"[{name.split('/')[1]}]({file})"
            for name, file in inputs.figures.items()
            if name.startswith("in_domain/")
        )
        + ".",
        "",
        "## Fits: L(k) = L_inf + A/(k+b)",
        "",
        "Per-size law, weighted least squares with weights k (the paper's practice), "
        "intervals in `fit.json`.",
        "",
        "| method | curve | L_inf | A | b | R² | RMSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, curve, floor, a, b, r2, rmse in fit_rows(inputs.fits.fits):
        out.append(
            f"| {method} | {curve} | {floor:.4f} | {a:.4f} | {b:.3f} | {r2:.4f} | {rmse:.2g} |"
        )
    out += warning_lines(inputs.fits.fits)
    out += ["", "## Plan (cross-domain)", ""]
    out += [
        "Stop rule: stop at the first k whose next expert gains less than the smallest "
        "worthwhile gain. k90: the k that reaches 90% of the loss drop from k = 1 to the pool.",
        "",
    ]
    if inputs.default_target:
        out += [f"Each target loss is {TARGET_ABOVE_FLOOR:.0%} above its method's floor.", ""]
    for method, p in inputs.plans.items():
        out += [f"- **{method}**", *(f"  - {line}" for line in p.describe())]
    out += ["", *pool_section(inputs), "", *geometry_section(inputs)]
    out += [
        "",
        "## The pool",
        "",
        "| domain | stdlib parts | files (held out) | training tokens | base CE | "
        "its expert alone |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in domains.items():
        out.append(
            f"| {name} | {', '.join(parts.get(name, ()))} | {info['files']} "
            f"({len(info['held_out_files'])}) | {info['train_tokens']:,} | "
            f"{inputs.base_ce[name]:.4f} | {_ce(inputs.own_domain_ce.get(name))} |"
        )
    settings = manifest["settings"]
    out += [
        "",
        f"Base: {settings['num_layers']} layers, hidden {settings['hidden_size']}, "
        f"{settings['base_steps']} steps of {settings['batch_size']}×{settings['seq_len']} "
        f"tokens on the mixture (lr {settings['base_lr']:g}); each expert: "
        f"{settings['expert_steps']} steps on its domain (lr {settings['expert_lr']:g}). "
        + (
            f"Built in this run ({manifest['build_seconds']:.0f} s)."
            if inputs.pool_built
            else f"Loaded from the cache (built once in {manifest['build_seconds']:.0f} s)."
        )
        + f" Cache: `{inputs.pool_dir}`.",
        "",
        "## Files and timings",
        "",
        "`records.jsonl` (one line per merged model; a re-run resumes it), `held_out.jsonl` "
        "(the held-out merges), `fit.json` (`hf-mergelaw plan fit.json ...` reads it), "
        "`plan.json`, `science.json`, `pool.json` (`hf-mergelaw pool ...` reads it), "
        "`pool_check.json`, `geometry.json` (the pool model from curvature) and "
        "`geometry_check.json`, the figures.",
        "",
        "| step | seconds |",
        "|---|---|",
    ]
    out += [f"| {step} | {seconds:.1f} |" for step, seconds in inputs.timings.items()]
    out += [
        "",
        f"torch threads: {inputs.threads}; 1-minute load average at start: "
        f"{inputs.load_average:.2f}.",
        "",
    ]
    return "\n".join(out)
