"""The demo's figures (PNG, written atomically):

- ``law_cross_domain.png``: the paper-style figure, macro CE of every merge against k with the
  subset means, the fitted ``L_inf + A/(k+b)`` and its bands, and residuals; one panel per method.
- ``law_in_domain_<method>.png``: the same per domain, each on its own held-out text.
- ``spread.png``: the sd across subsets against k, with the finite-pool reference.
- ``geometry_predicted.png``: each method's pool model from curvature at the base (no merge)
  against every merge the demo measured.
- ``pool_held_out.png``: the pool model's predictions of the held-out merges against what they
  measured, one row per method; ``pool/<method>-macro-{synergy,effects,predicted}.png``: each
  method's interactions, expert effects and leave-one-out predictions
  (:mod:`hf_mergelaw.pool_model.plotting`).

    paths = draw_figures(rows, fit_report, check, output_dir, num_parameters=1_300_000)
    paths |= draw_pool_figures(pool_check, output_dir)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_mergelaw.files import write_atomic
from hf_mergelaw.law import FitReport, load_records
from hf_mergelaw.law.plotting import plot_sweep
from hf_mergelaw.pool_model.plotting import draw_predicted, plot_pool
from hf_mergelaw.record_schema import CROSS_DOMAIN

from .geometry_check import GeometryCheck
from .pool_check import PoolCheck
from .science import ScienceCheck, finite_pool_sd

_DPI = 130


def draw_figures(
    rows: Sequence[Mapping[str, Any]],
    report: FitReport,
    check: ScienceCheck,
    output_dir: Path,
    *,
    num_parameters: int,
) -> dict[str, Path]:
    """Write the figures into ``output_dir``; returns {name: path}: ``cross_domain``,
    ``in_domain/<method>`` and ``spread``."""
    size = f"base of {num_parameters / 1e6:.2f}M parameters"
    paths = {"cross_domain": output_dir / "law_cross_domain.png"}
    cross = [r for r in rows if r["domain"] == CROSS_DOMAIN]
    fits = [f for f in report.fits if f.group["domain"] == CROSS_DOMAIN]
    fig = plot_sweep(load_records(cross), fits, by=("method",))
    _retitle(fig, f"Cross-domain: macro CE over every domain's held-out text ({size})")
    _save(fig, paths["cross_domain"])
    for method in dict.fromkeys(r["method"] for r in rows):
        path = paths[f"in_domain/{method}"] = output_dir / f"law_in_domain_{method}.png"
        within = [r for r in rows if r["method"] == method and r["domain"] != CROSS_DOMAIN]
        fits = [
            f
            for f in report.fits
            if f.group["method"] == method and f.group["domain"] != CROSS_DOMAIN
        ]
        fig = plot_sweep(load_records(within), fits, by=("domain",))
        _retitle(fig, f"In-domain, {method}: each domain's CE on its own held-out text ({size})")
        _save(fig, path)
    paths["spread"] = output_dir / "spread.png"
    _save(spread_figure(check, report), paths["spread"])
    return paths


def draw_pool_figures(check: PoolCheck, output_dir: Path) -> dict[str, Path]:
    """The pool model's figures; returns {name: path}: ``pool_held_out`` and
    ``pool/<method>-<figure>``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = {"pool_held_out": output_dir / "pool_held_out.png"}
    fig = Figure(figsize=(12.5, 5.2 * len(check.methods)), layout="constrained")
    FigureCanvasAgg(fig)
    rows = np.atleast_1d(fig.subfigures(len(check.methods), 1))
    for row, method in zip(rows, check.methods, strict=True):
        held_out = (method.held_members, method.held_ce) if len(method.held_ce) else None
        draw_predicted(row, method.model, held_out=held_out)
    _save(fig, paths["pool_held_out"])
    for method in check.methods:
        for path in plot_pool(method.model, output_dir / "pool"):
            paths[f"pool/{path.stem}"] = path
    return paths


def draw_geometry_figure(check: GeometryCheck, output_dir: Path) -> dict[str, Path]:
    """``geometry_predicted``: each method's zero-merge prediction against every merge the demo
    measured (one row per method)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = output_dir / "geometry_predicted.png"
    fig = Figure(figsize=(12.5, 5.2 * len(check.methods)), layout="constrained")
    FigureCanvasAgg(fig)
    rows = np.atleast_1d(fig.subfigures(len(check.methods), 1))
    for row, method in zip(rows, check.methods, strict=True):
        measured = method.measured
        draw_predicted(row, method.prior, held_out=(measured.members, measured.ce))
    _save(fig, path)
    return {"geometry_predicted": path}


def _retitle(fig: Any, title: str) -> None:
    """One base size: its legend says nothing the title cannot, in parameters not billions."""
    for legend in list(fig.legends):
        legend.remove()
    fig.suptitle(title)


def spread_figure(check: ScienceCheck, report: FitReport) -> Any:
    """One panel per method: sd across subsets of the cross-domain CE and the mean in-domain sd
    against k, the fitted variance law, and the quadratic model's finite-pool shape."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(check.methods)
    fig = Figure(figsize=(5.0 * n, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    m = check.num_experts
    grid = np.linspace(1, m - 1, 100)
    for ax, method in zip(axes, check.methods, strict=True):
        points = method.spread_points
        k = np.array([p.k for p in points])
        sd = np.array([p.sd for p in points])
        ax.plot(k, sd, "o-", color="C0", label="cross-domain (macro CE)")
        ax.plot(
            k,
            [p.in_domain_sd for p in points],
            "s--",
            color="C1",
            mfc="none",
            label="in-domain (mean over domains)",
        )
        ax.plot(
            grid,
            sd[0] * finite_pool_sd(grid, m),
            ":",
            color="0.35",
            label=f"quadratic model: ∝ √((M−k)/(k(M−1))), M={m}",
        )
        fit = next(
            f
            for f in report.fits
            if f.group["method"] == method.method and f.group["domain"] == CROSS_DOMAIN
        )
        if fit.variance is not None:
            var = fit.variance.predict(None, grid).mean
            ax.plot(
                grid,
                np.sqrt(np.clip(var, 0, None)),
                color="C0",
                lw=0.8,
                alpha=0.6,
                label="variance law fit",
            )
        ax.set_yscale("log")
        ax.set_xticks(range(1, m))
        ax.set_xlabel("experts merged (k)")
        ax.set_title(
            f"method={method.method}  (sd ~ k^{method.spread_slope:.2f} over k=1..{m - 1})",
            fontsize=10,
        )
        ax.grid(alpha=0.25, which="both")
    axes[0].set_ylabel("sd across subsets (nats/token)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Spread across subsets shrinks as k grows (k = M has a single subset)")
    return fig


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    write_atomic(path, buffer.getvalue())
