"""Figures of a pool model: the synergy heatmap (gamma), the experts' effects (beta) and
leave-one-out predictions against the measured CEs.

matplotlib's object API with the Agg canvas (no pyplot state); each PNG is written atomically::

    paths = plot_pool(model, Path("figures"))   # <group>-synergy.png, -effects.png, -predicted.png
    draw_predicted(figure, model, held_out=(members, ce))   # merges it never saw, into a figure
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic
from .accuracy import coverage, shape_r2, within_k_r2
from .model import PoolModel

# Pools up to this size get each gamma written in its cell.
_ANNOTATE_UP_TO = 12


def file_stem(model: PoolModel) -> str:
    """``"average-macro"``: the group's values, safe as a file name."""
    text = "-".join(str(value) for value in model.group.values()) or "pool"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def plot_pool(model: PoolModel, directory: Path) -> list[Path]:
    """Write the three figures of ``model`` into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = file_stem(model)
    out = []
    for name, draw in (
        ("synergy", _synergy),
        ("effects", _effects),
        ("predicted", draw_predicted),
    ):
        path = directory / f"{stem}-{name}.png"
        _save(draw, model, path)
        out.append(path)
    return out


def _save(draw: Callable[[Any, PoolModel], None], model: PoolModel, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = max(4.5, 0.45 * model.m + 2)
    wide = 2 if draw is draw_predicted else 1
    figure = Figure(figsize=(wide * size + 1, size), layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure, model)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    write_atomic(path, buffer.getvalue())


def _synergy(figure: Any, model: PoolModel) -> None:
    ax = figure.add_subplot()
    gamma = model.gamma_matrix()
    shown = np.where(np.eye(model.m, dtype=bool), np.nan, gamma)
    limit = float(np.nanmax(np.abs(shown))) or 1.0
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(model.m), model.experts, rotation=60, ha="right")
    ax.set_yticks(range(model.m), model.experts)
    if model.m <= _ANNOTATE_UP_TO:
        for i in range(model.m):
            for j in range(model.m):
                if i != j:
                    ax.text(j, i, f"{gamma[i, j] * 1e3:.1f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=ax, label="gamma (nats; blue = synergy)")
    cells = " (cells: x1e-3)" if model.m <= _ANNOTATE_UP_TO else ""
    ax.set_title(f"{_title(model)}\npairwise interactions gamma{cells}", fontsize=10)


def _effects(figure: Any, model: PoolModel) -> None:
    ax = figure.add_subplot()
    beta, interval = model.beta, model.beta_interval()
    names = sorted(beta, key=beta.get)
    values = np.array([beta[n] for n in names])
    lo = values - np.array([interval[n][0] for n in names])
    hi = np.array([interval[n][1] for n in names]) - values
    colors = ["tab:blue" if v < 0 else "tab:red" for v in values]
    ax.barh(range(len(names)), values, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"beta (nats; negative lowers the CE), {model.level:.0%} intervals")
    ax.set_title(f"{_title(model)}\neach expert's own effect beta", fontsize=10)


def draw_predicted(
    figure: Any, model: PoolModel, held_out: tuple[np.ndarray, np.ndarray] | None = None
) -> None:
    """Predicted against measured CE into ``figure`` (a matplotlib Figure or SubFigure). Left:
    CE; right: the same as deviations from each size's mean CE (what the pool model adds to the
    law; a model without intervals, whose level is not calibrated, has its predictions centred
    on their own mean per size: the shape). The points: the fitted merges, each predicted with it
    left out of the fit, or ``held_out = (members, ce)``, merges the model was not fitted on
    (boolean rows over ``model.experts``) and what they measured."""
    ce, mean, half, k = _points(model, held_out)
    level, own_level = np.zeros_like(ce), np.zeros_like(ce)
    for size in np.unique(k):
        level[k == size] = ce[k == size].mean()
        own_level[k == size] = mean[k == size].mean()
    r2 = within_k_r2(ce, mean, k)
    if model.has_intervals:
        how = "merge left out of the fit" if held_out is None else "merges it was not fitted on"
        how += f", {model.level:.0%} interval"
        scored = f"{model.level:.0%} intervals cover {coverage(ce, mean - half, mean + half):.0%}"
        centred, centred_what = level, "CE - mean CE of its k"
    else:
        how, centred, centred_what = "second order, no merge", own_level, "CE - its mean at k"
        scored = f"shape R^2 {shape_r2(ce, mean, k):.3f} (no interval before calibration)"
    panels = (
        (0.0, 0.0, "CE", "CE"),
        (centred, level, centred_what, "CE - mean CE of its k"),
    )
    for n, (x_shift, y_shift, x_what, y_what) in enumerate(panels):
        ax = figure.add_subplot(1, 2, n + 1)
        x, y = mean - x_shift, ce - y_shift
        ax.errorbar(x, y, xerr=half, fmt="none", ecolor="0.75", elinewidth=0.8, zorder=1)
        points = ax.scatter(x, y, c=k, cmap="viridis", s=14, zorder=2)
        edges = [min(x.min(), y.min()), max(x.max(), y.max())]
        ax.plot(edges, edges, color="black", linewidth=0.8)
        ax.set_xlabel(f"predicted {x_what}\n({how})")
        ax.set_ylabel(f"measured {y_what}")
    figure.colorbar(points, ax=ax, label="k")
    figure.suptitle(f"{_title(model)}: R^2 within k {r2:.3f}, {scored}", fontsize=10)


def _points(
    model: PoolModel, held_out: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(measured CE, predicted mean, interval half-width, k) of the points to draw."""
    if held_out is not None:
        members, ce = np.asarray(held_out[0], dtype=bool), np.asarray(held_out[1], dtype=float)
        prediction = model.predict(members)
        return ce, prediction.mean, prediction.hi - prediction.mean, members.sum(axis=1)
    records, t = model.records, model.t_value()
    # Records that alone pin a parameter (the one merge of a size) have no such prediction.
    ok = np.isfinite(records.loo_mean)
    return records.ce[ok], records.loo_mean[ok], t * records.loo_sd[ok], records.k[ok]


def _title(model: PoolModel) -> str:
    return ", ".join(f"{key}={value}" for key, value in model.group.items()) or "pool"
