"""`chatfabric arena import FILE` and `chatfabric arena export`: flags and runs (the work is in
`arena/transfer.py`, imported when a command runs)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path


def add_import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, metavar="FILE",
                   help="FastChat clean-battle file: a JSON array or JSON Lines of battles (model_a, model_b, "
                   "winner, tstamp, anony; optional conversation_a/b, question_id, judge)")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, metavar="FILE", help="where to write (default: standard output)")
    p.add_argument("--all", dest="anonymous_only", action="store_false",
                   help="named side-by-side votes too (default: anonymous votes only)")
    p.add_argument("--no-conversations", dest="conversations", action="store_false",
                   help="leave the conversations out (they are held in memory while writing)")


def _connect(args, stop: asyncio.Event):
    from ..proto.bus import connect_from_args

    return connect_from_args(args, "arena", stop, role="arena")


async def run_import(args, stop: asyncio.Event) -> None:
    from ..proto.contract import ContractMissing
    from .transfer import import_file

    if not args.file.is_file():
        raise ValueError(f"FILE {args.file}: no such file")
    async with _connect(args, stop) as bus:
        try:
            report = await import_file(bus, args.file)
        except ContractMissing as err:
            raise ConnectionError(str(err)) from None
    print(f"{args.file}: {report.battles} battles, {report.stored} stored, {report.present} already in ARENA")


async def run_export(args, stop: asyncio.Event) -> None:
    from ..proto.contract import ContractMissing
    from ..proto.files import atomic_writer
    from .transfer import export_records

    if args.output is not None and args.output.is_dir():
        raise ValueError(f"--output {args.output}: is a folder; give a file name")
    async with _connect(args, stop) as bus, contextlib.AsyncExitStack() as files:
        # a file appears whole, once every vote is written: a failure leaves no half of one
        out = sys.stdout if args.output is None else files.enter_context(atomic_writer(args.output))
        try:
            written = await export_records(bus, out, anonymous_only=args.anonymous_only,
                                           with_conversations=args.conversations)
        except ContractMissing as err:
            raise ConnectionError(str(err)) from None
    print(f"{written} battles written" + (f" to {args.output}" if args.output else ""), file=sys.stderr)
