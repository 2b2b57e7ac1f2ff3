"""The leaderboard's figures from a `Results`: ratings with their 95% intervals, the
win-fraction heat map and the battle-count heat map, as matplotlib Figures (the arena's
Leaderboard tab shows the same ones), and `save_plots`, which writes each as PNG and as a
standalone HTML page holding the SVG inline (no script, no network: it opens offline).

Figures are built with `matplotlib.figure.Figure`, never pyplot, so nothing here touches a
global backend or figure registry and they can be drawn from any thread."""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .results import Results

_MAX_LABELLED_CELLS = 400  # annotate heat-map cells up to 20 x 20 models


def rating_figure(results: Results) -> Figure:
    """Each model's rating with its 95% bootstrap interval, best first."""
    rows = results.rows
    figure = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    x = np.arange(len(rows))
    rating = np.array([row.rating for row in rows])
    below = rating - np.array([row.lower for row in rows])
    above = np.array([row.upper for row in rows]) - rating
    axes.errorbar(x, rating, yerr=[below, above], fmt="o", capsize=3)
    axes.set_xticks(x, [row.model for row in rows], rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("rating")
    system = "Bradley-Terry" if results.rating_system == "bt" else "online Elo"
    axes.set_title(f"{system} ratings, 95% intervals ({results.bootstrap_rounds} bootstrap rounds, "
                   f"{results.battles:,} battles)")
    axes.grid(axis="y", alpha=0.3)
    return figure


def win_fraction_figure(results: Results) -> Figure:
    """Row model's wins over column model, per battle between them without ties."""
    matrix = np.array([[np.nan if v is None else v for v in row] for row in results.win_fraction], float)
    matrix = matrix.reshape(len(results.models), -1)
    return _heat_map(results.models, matrix, "fraction of battles won by the row model (ties excluded)", "{:.2f}",
                     "RdBu")


def battle_count_figure(results: Results) -> Figure:
    """Battles between each pair of models, in either seat."""
    matrix = np.array(results.battle_count, float).reshape(len(results.models), -1)
    return _heat_map(results.models, matrix, "battles between each pair of models", "{:.0f}", "viridis")


def _heat_map(models: list[str], matrix: np.ndarray, title: str, label: str, cmap: str) -> Figure:
    size = max(5.0, 0.3 * len(models) + 3)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap=cmap)
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = np.arange(len(models))
    axes.set_xticks(ticks, models, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(ticks, models, fontsize=8)
    axes.set_xlabel("column model")
    axes.set_ylabel("row model")
    axes.set_title(title)
    if matrix.size <= _MAX_LABELLED_CELLS:
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                axes.text(j, i, label.format(value), ha="center", va="center", fontsize=7)
    return figure


def figures(results: Results) -> dict[str, Figure]:
    return {"rating": rating_figure(results), "win_fraction": win_fraction_figure(results),
            "battle_count": battle_count_figure(results)}


def svg_page(figure: Figure, title: str) -> str:
    """A standalone HTML page with the figure as inline SVG."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and doctype
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"</head>\n<body>\n{svg}\n</body>\n</html>\n")


def save_plots(results: Results, folder: Path) -> list[Path]:
    """Write `<name>.png` and `<name>.html` for every figure into `folder`; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures(results).items():
        png, page = folder / f"{name}.png", folder / f"{name}.html"
        figure.savefig(png, dpi=120)
        page.write_text(svg_page(figure, f"chatfabric leaderboard: {name.replace('_', ' ')}"), encoding="utf-8")
        written += [png, page]
    return written
