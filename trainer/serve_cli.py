"""`chatfabric trainer serve`: the trainer service (`service.py`) on the fabric."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Callable

from ..proto.bus import connect_from_args


def add_args(p: argparse.ArgumentParser, common: Callable[[argparse.ArgumentParser], None]) -> None:
    parsers = p.add_subparsers(dest="trainer_command", required=True, metavar="SUBCOMMAND")
    serve = parsers.add_parser("serve", help="take train jobs from the fabric",
                               description="Take train jobs from JOBS, train, publish progress and models.")
    serve.add_argument("--work-dir", help="where jobs are unpacked and trained (default: a temporary folder)")
    serve.add_argument("--shutdown-grace", type=float, default=60.0,
                       help="seconds a running job gets to reach a checkpoint on shutdown (default: %(default)s)")
    common(serve)


async def run(args, stop: asyncio.Event) -> None:
    from .service import ServiceConfig, serve

    config = ServiceConfig(shutdown_grace=args.shutdown_grace)
    if args.work_dir:
        config = ServiceConfig(work_dir=Path(args.work_dir), shutdown_grace=args.shutdown_grace)
    async with connect_from_args(args, "trainer", stop, role="trainer") as bus:
        await serve(bus, config, stop)
