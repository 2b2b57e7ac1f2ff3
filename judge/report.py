"""A finished job's files: answers, judgments and summary as JSON / JSON lines (FastChat's
shapes), the table as text, and a per-category chart as PNG and as one standalone HTML page.
Plots are drawn off the event loop by the caller (`asyncio.to_thread(write_report, ...)`)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .results import format_summary


def write_report(folder: Path, summary: dict, answers: bytes | None = None, judgments: bytes | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in (("answers.jsonl", answers), ("judgments.jsonl", judgments)):
        if data is not None:
            (folder / name).write_bytes(data)
            written.append(folder / name)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    table = format_summary(summary)
    (folder / "table.txt").write_text(table + "\n")
    png = category_chart(summary)
    (folder / "categories.png").write_bytes(png)
    (folder / "report.html").write_text(html_page(summary, table, png))
    return [*written, *(folder / n for n in ("summary.json", "table.txt", "categories.png", "report.html"))]


def category_chart(summary: dict) -> bytes:
    """Grouped bars: one group per category, one bar per model (mean score, or adjusted win
    rate for pairwise modes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    models = summary["models"]
    categories = sorted({c for e in models for c in e["categories"]}) or ["(none)"]
    figure = Figure(figsize=(max(6.0, 1.1 * len(categories) + 2), 4.0), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(1, len(models))
    for i, entry in enumerate(models):
        values = [entry["categories"].get(c) or 0.0 for c in categories]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=entry["model"])
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(categories))], categories, rotation=30)
    single = summary["mode"] == "single"
    ax.set_ylabel("mean score (1-10)" if single else "adjusted win rate")
    ax.set_ylim(0, 10 if single else 1)
    ax.set_title(f"{summary.get('job', {}).get('bench', 'bench')}: {summary['mode']}")
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def html_page(summary: dict, table: str, png: bytes) -> str:
    title = f"Judge results: {summary['mode']}"
    settings = html.escape(json.dumps(summary.get("job", {}), indent=1))
    image = base64.b64encode(png).decode()
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n<pre>{html.escape(table)}</pre>\n"
            f"<img alt='per-category chart' src='data:image/png;base64,{image}'>\n"
            f"<h2>Settings</h2><pre>{settings}</pre></body></html>\n")
