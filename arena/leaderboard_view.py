"""The arena's Leaderboard tab: the latest snapshot the leaderboard follower published
(`chatfabric leaderboard --follow`, started by `chatfabric up`), as a table and three plots."""

from __future__ import annotations

import asyncio
import datetime
import logging

from .results import Results

log = logging.getLogger(__name__)

COLUMNS = ["Rank", "Model", "Rating", "95% CI", "Votes", "Online Elo", "Style-controlled"]
NO_SNAPSHOT = ("No leaderboard yet: it appears once votes are recorded and a leaderboard follower "
               "(`chatfabric leaderboard --follow`, started by `chatfabric up`) has published a snapshot.")


def leaderboard_components() -> list:
    """Status line, table and plots, in the order `leaderboard_outputs` fills them."""
    import gradio as gr

    status = gr.Markdown(NO_SNAPSHOT, elem_id="leaderboard-status")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="leaderboard-table", wrap=True)
    with gr.Row():
        ratings = gr.Plot(label="Ratings with 95% intervals", elem_id="leaderboard-ratings")
    with gr.Row():
        wins = gr.Plot(label="Win fraction (row beats column, ties excluded)", elem_id="leaderboard-wins")
        counts = gr.Plot(label="Battles per pair", elem_id="leaderboard-counts")
    return [status, table, ratings, wins, counts]


def _when(unix: float | None) -> str:
    if unix is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def rows(results: Results) -> list[list]:
    def ci(row) -> str:
        return f"+{row.upper - row.rating:.1f} / -{row.rating - row.lower:.1f}"

    return [[row.rank, row.model, round(row.rating, 1), ci(row), row.votes, round(row.online_elo, 1),
             None if row.style_rating is None else round(row.style_rating, 1)] for row in results.rows]


def status_line(results: Results) -> str:
    system = "Bradley-Terry" if results.rating_system == "bt" else "Elo"
    last = results.last_vote_at
    counted = f"latest vote counted cast at {_when(last)}" if last is not None else "no votes"
    plural = "" if results.battles == 1 else "s"
    return (f"{results.battles:,} {'anonymous ' if results.anonymous_only else ''}battle{plural}, {system} ratings, "
            f"{results.bootstrap_rounds} bootstrap rounds; {counted} (stream sequence {results.last_seq}); "
            f"computed {_when(results.computed_at)}.")


def _figures(results: Results):
    import matplotlib.pyplot as plt

    from .plots import battle_count_figure, rating_figure, win_fraction_figure

    figures = rating_figure(results), win_fraction_figure(results), battle_count_figure(results)
    for figure in figures:
        plt.close(figure)  # gradio renders them; pyplot must not keep them alive
    return figures


async def leaderboard_outputs(bus) -> tuple:
    """(status, table rows, three figures) from the latest snapshot; a status naming what is
    missing when there is none or it cannot be read."""
    from .feed import latest_snapshot

    try:
        results = await latest_snapshot(bus)
    except Exception as err:
        log.warning("leaderboard snapshot unreadable: %s", err)
        return f"The leaderboard cannot be read right now ({err}).", [], None, None, None
    if results is None or not results.rows:
        return NO_SNAPSHOT, [], None, None, None
    figures = await asyncio.to_thread(_figures, results)
    return (status_line(results), rows(results), *figures)
