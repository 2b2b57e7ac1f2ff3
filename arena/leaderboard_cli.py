"""`chatfabric leaderboard`: its flags and its run; `deploy/cli.py` composes it.

The rating code (numpy, scipy, matplotlib: the `arena` extra) is imported only when the
command runs, so the rest of the command line works without it."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def parse_time(text: str) -> float:
    """ISO 8601 (a time without a zone is UTC) or unix seconds, as unix seconds."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither an ISO 8601 time (2026-11-28T12:00:00Z) nor unix seconds") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return when.timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: unix seconds are finite and not negative")
    return seconds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("leaderboard")
    g.add_argument("--from-file", type=Path, metavar="BATTLES",
                   help="rate a FastChat clean-battle file (JSON array or JSON Lines) instead of the ARENA stream; "
                   "no bus is joined")
    g.add_argument("--as-of", type=parse_time, metavar="TIME",
                   help="the leaderboard as it was then: votes stored in ARENA up to TIME (for a file: battles "
                   "whose tstamp is up to TIME); ISO 8601 (UTC unless a zone is given) or unix seconds")
    anonymity = g.add_mutually_exclusive_group()
    anonymity.add_argument("--anonymous-only", dest="anonymous_only", action="store_true", default=True,
                           help="rate only votes cast with the names hidden (default)")
    anonymity.add_argument("--all", dest="anonymous_only", action="store_false",
                           help="rate named side-by-side votes too")
    g.add_argument("--exclude-ties", action="store_true", help="leave out tie and tie (bothbad) votes")
    g.add_argument("--rating-system", choices=["bt", "elo"], default="bt",
                   help="the rating column and its intervals: Bradley-Terry or online Elo (default: %(default)s)")
    g.add_argument("--bootstrap", type=positive_int, default=100, metavar="ROUNDS",
                   help="bootstrap rounds for the 95%% intervals (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default: %(default)s)")
    g.add_argument("--output", type=Path, metavar="RESULTS.json", help="write the results as JSON")
    g.add_argument("--plots", type=Path, metavar="DIR",
                   help="write rating, win-fraction and battle-count plots as PNG and HTML into DIR")
    g.add_argument("--follow", action="store_true",
                   help="keep running: follow ARENA through the durable consumer 'leaderboard' and publish "
                   "the leaderboard as the artifact leaderboard/latest.json")
    g.add_argument("--snapshot-interval", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="with --follow: seconds between two snapshots at least (default: %(default)s)")


def check_args(args) -> None:
    """Combinations argparse cannot check; ValueError names the flags."""
    if args.follow and args.from_file is not None:
        raise ValueError("--follow reads the ARENA stream: it cannot be combined with --from-file")
    if args.follow and args.as_of is not None:
        raise ValueError("--follow keeps the leaderboard current: it cannot be combined with --as-of")
    if args.from_file is not None and not args.from_file.is_file():
        raise ValueError(f"--from-file {args.from_file}: no such file")
    if args.plots is not None and args.plots.exists() and not args.plots.is_dir():
        raise ValueError(f"--plots {args.plots}: exists and is not a folder")
    if args.output is not None and args.output.is_dir():
        raise ValueError(f"--output {args.output}: is a folder; give a file name")


async def run(args, stop: asyncio.Event) -> None:
    check_args(args)
    if args.follow:
        await _follow(args, stop)
        return
    if args.from_file is not None:
        results = await asyncio.to_thread(_results_from_file, args)
    else:
        results = await _results_from_stream(args)
    await asyncio.to_thread(_report, results, args)


def _options(args) -> dict:
    return dict(rating_system=args.rating_system, rounds=args.bootstrap, seed=args.seed,
                anonymous_only=args.anonymous_only, exclude_ties=args.exclude_ties)


def _results_from_file(args):
    from .battles import read_battles
    from .results import compute_results

    battles = read_battles(args.from_file)
    if args.as_of is not None:
        battles = battles.take(battles.tstamp <= args.as_of)
    return compute_results(battles, **_options(args), as_of=args.as_of, source=str(args.from_file))


async def _connected(args, stop):
    from ..proto.bus import connect_from_args

    return connect_from_args(args, "leaderboard", stop, role="leaderboard")


async def _results_from_stream(args):
    from ..proto.contract import ContractMissing
    from ..proto.subjects import ARENA_STREAM
    from .feed import read_arena
    from .results import compute_results

    async with await _connected(args, asyncio.Event()) as bus:
        try:
            tally = await read_arena(bus, until=args.as_of, anonymous_only=args.anonymous_only)
        except ContractMissing as err:
            raise ConnectionError(str(err)) from None
    battles = await asyncio.to_thread(tally.columns.battles, tally.style)
    return await asyncio.to_thread(compute_results, battles, **_options(args), as_of=args.as_of,
                                   last_seq=tally.last_seq, source=ARENA_STREAM)


async def _follow(args, stop: asyncio.Event) -> None:
    from ..proto.contract import ContractMissing
    from .feed import FollowOptions, follow

    options = FollowOptions(**_options(args), snapshot_interval=args.snapshot_interval, output=args.output)
    async with await _connected(args, stop) as bus:
        try:
            await follow(bus, options, stop)
        except ContractMissing as err:
            raise ConnectionError(str(err)) from None


def _report(results, args) -> None:
    """The terminal table, and the JSON and plots when asked for."""
    if args.output is not None:
        from ..proto.files import write_atomic

        write_atomic(args.output, results.model_dump_json(indent=1) + "\n")
    if args.plots is not None:
        from .plots import save_plots

        save_plots(results, args.plots)
    sys.stdout.write(table(results))


def table(results) -> str:
    """rank, model, rating, 95% interval, votes (and the style-controlled rating when known)."""
    styled = any(row.style_rating is not None for row in results.rows)
    width = max([5, *(len(row.model) for row in results.rows)])
    head = f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {'95% CI':>17}  {'votes':>7}"
    lines = [head + ("  style-controlled" if styled else "")]
    for row in results.rows:
        line = (f"{row.rank:>4}  {row.model:<{width}}  {row.rating:>7.1f}  "
                f"{f'[{row.lower:.1f}, {row.upper:.1f}]':>17}  {row.votes:>7}")
        if styled:
            line += f"  {row.style_rating:>16.1f}" if row.style_rating is not None else f"  {'-':>16}"
        lines.append(line)
    system = "Bradley-Terry" if results.rating_system == "bt" else "online Elo"
    when = "all votes" if results.as_of is None else "as of " + datetime.datetime.fromtimestamp(
        results.as_of, datetime.timezone.utc).isoformat(timespec="seconds")
    kind = "anonymous" if results.anonymous_only else "all"
    seq = "" if results.last_seq is None else f", up to ARENA sequence {results.last_seq}"
    lines.append(f"{results.battles:,} battles ({kind} votes{', no ties' if results.exclude_ties else ''}), "
                 f"{system}, {results.bootstrap_rounds} bootstrap rounds, {when}{seq}")
    return "\n".join(lines) + "\n"
