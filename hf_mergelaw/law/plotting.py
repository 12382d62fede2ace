"""Paper-style figures: subset scatter, mean CE versus k per size, fitted curves with bands,
and a residual panel under each group.

Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global state or
the user's backend::

    fig = plot_sweep(records, report.fits, by=("method",), path="fig.png")
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LawError
from ..files import write_atomic
from .fit_result import FitResult
from .records import SweepRecords, at_size, make_cells

_MAX_COLUMNS = 3


def _matches(fit: FitResult, group: dict[str, Any]) -> bool:
    return all(str(fit.group.get(k)) == str(v) for k, v in group.items())


def _size_label(size: float) -> str:
    return "records" if np.isnan(size) else f"{size:g}B"


def plot_sweep(
    records: SweepRecords,
    fits: Sequence[FitResult] = (),
    *,
    by: Sequence[str] = (),
    level: float = 0.9,
    path: str | Path | None = None,
    seed: int = 0,
) -> Any:
    """Draw one panel pair (data + fits, residuals) per group of ``records``.

    Args:
        records: validated records (see :func:`load_records`).
        fits: fits to overlay; a fit is drawn in the panel whose group values it shares.
        by: grouping fields, as given to ``fit_sweep``.
        level: coverage of the mean-curve band (shaded) and single-merge band (dashed).
        path: write the figure there (format from the suffix), atomically.
        seed: seed of the horizontal jitter of the subset scatter.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = records.groups(list(by))
    n_cols = min(len(groups), _MAX_COLUMNS)
    n_rows = -(-len(groups) // n_cols)
    fig = Figure(figsize=(5.2 * n_cols, 5.4 * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(n_rows, n_cols)
    all_sizes = np.unique(records.N)
    colors = _size_colors(all_sizes)
    rng = np.random.default_rng(seed)
    for i, (group, recs) in enumerate(groups):
        inner = outer[i // n_cols, i % n_cols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
        ax, res_ax = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        res_ax.sharex(ax)
        group_fits = [f for f in fits if _matches(f, group)]
        _draw_group(ax, res_ax, recs, group_fits, colors, level, rng)
        ax.set_title(_title(group, group_fits), fontsize=10)
        ax.tick_params(labelbottom=False)
        if i % n_cols == 0:
            ax.set_ylabel("cross-entropy (nats/token)")
            res_ax.set_ylabel("residual")
        res_ax.set_xlabel("experts merged (k)")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title="base size", fontsize=8)
    if path is not None:
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        if fmt not in fig.canvas.get_supported_filetypes():
            raise LawError(
                f"cannot write a .{fmt} figure; use one of "
                f"{sorted(fig.canvas.get_supported_filetypes())}"
            )
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=130)
        write_atomic(path, buffer.getvalue())
    return fig


def _size_colors(sizes: np.ndarray) -> dict[float, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    finite = sizes[np.isfinite(sizes)]
    if finite.size == 0:
        return {float("nan"): cmap(0.35)}
    ranks = np.linspace(0.0, 0.9, finite.size)
    return {float(s): cmap(r) for s, r in zip(finite, ranks, strict=True)}


def _color(colors: dict[float, Any], size: float) -> Any:
    return next(iter(colors.values())) if np.isnan(size) else colors[float(size)]


def _title(group: dict[str, Any], fits: Sequence[FitResult]) -> str:
    label = ", ".join(f"{k}={v}" for k, v in group.items()) or "all records"
    if len(fits) == 1:
        label += f"  ({fits[0].form}, R²={fits[0].r2:.3f})"
    elif fits:
        label += f"  ({fits[0].form}, {len(fits)} fits, R²≥{min(f.r2 for f in fits):.3f})"
    return label


def _draw_group(
    ax: Any,
    res_ax: Any,
    recs: SweepRecords,
    fits: Sequence[FitResult],
    colors: dict[float, Any],
    level: float,
    rng: np.random.Generator,
) -> None:
    cells = make_cells(recs)
    k_max = int(cells.k.max())
    k_grid = np.linspace(1, k_max, 120)
    for size in np.unique(cells.N):
        color = _color(colors, size)
        in_size = at_size(recs.N, size)
        jitter = rng.uniform(-0.14, 0.14, int(in_size.sum()))
        ax.scatter(recs.k[in_size] + jitter, recs.ce[in_size], s=4, color=color, alpha=0.18, lw=0)
        at = at_size(cells.N, size)
        ax.plot(
            cells.k[at],
            cells.mean[at],
            "o",
            color=color,
            mec="black",
            mew=0.6,
            ms=5,
            label=_size_label(size),
        )
        fit = _fit_for_size(fits, size)
        if fit is None:
            continue
        pred = fit.predict(None if np.isnan(size) else size, k_grid, level=level)
        ax.plot(k_grid, pred.mean, color=color, lw=1.4)
        ax.fill_between(k_grid, pred.lo, pred.hi, color=color, alpha=0.25, lw=0)
        for edge in (pred.pi_lo, pred.pi_hi):
            ax.plot(k_grid, edge, color=color, lw=0.6, ls="--", alpha=0.45)
        fc = fit.cells
        on = at_size(fc.N, size)
        res_ax.plot(fc.k[on], fc.residuals[on], "o-", color=color, ms=3.5, lw=0.8)
    res_ax.axhline(0.0, color="0.4", lw=0.8)
    ax.set_xticks(range(1, k_max + 1))
    ax.grid(alpha=0.25)
    res_ax.grid(alpha=0.25)


def _fit_for_size(fits: Sequence[FitResult], size: float) -> FitResult | None:
    requested = None if np.isnan(size) else [float(size)]
    for fit in fits:
        if "N" in fit.law.variables and requested is None:
            continue
        if fit.sizes_for(requested):
            return fit
    return None
