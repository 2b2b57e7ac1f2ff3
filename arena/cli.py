"""`chatfabric arena SUBCOMMAND`: the arena's commands, each in its own module with
`add_args(parser)` and `async run(args, stop)` (names configurable per entry), composed here as
`deploy/cli.py` composes the top-level commands (which names the extra when one is missing)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    module: str  # relative to the chatfabric package
    add_args: str = "add_args"
    run: str = "run"


SUBCOMMANDS = (
    Subcommand("serve", "serve the arena web UI (battles, side by side, direct chat, leaderboard)", "arena.ui"),
    Subcommand("import", "publish a FastChat clean-battle file into ARENA, idempotently", "arena.transfer_cli",
               "add_import_args", "run_import"),
    Subcommand("export", "write ARENA's votes as a FastChat clean-battle file (JSON Lines)", "arena.transfer_cli",
               "add_export_args", "run_export"),
)


def _module(sub: Subcommand):
    return importlib.import_module(f"..{sub.module}", __package__)


def add_args(p: argparse.ArgumentParser, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Each subcommand's flags, plus the `common` ones (NATS URL, credentials, log level)."""
    parsers = p.add_subparsers(dest="arena_command", required=True, metavar="SUBCOMMAND")
    for sub in SUBCOMMANDS:
        parser = parsers.add_parser(sub.name, help=sub.help, description=sub.help)
        getattr(_module(sub), sub.add_args)(parser)
        common(parser)


async def run(args, stop: asyncio.Event) -> None:
    sub = next(s for s in SUBCOMMANDS if s.name == args.arena_command)
    await getattr(_module(sub), sub.run)(args, stop)
