"""`chatfabric gateway`: its flags, its configuration and its run; `deploy/cli.py` composes it."""

from __future__ import annotations

import argparse
import asyncio
import os

from ..proto.bus import connect_from_args
from ..proto.defaults import GATEWAY_PORT
from .app import GatewayConfig, serve

def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    g.add_argument("--port", type=int, default=GATEWAY_PORT, help="HTTP port (default: %(default)s)")
    g.add_argument(
        "--api-keys",
        default=os.environ.get("CHATFABRIC_API_KEYS", ""),
        help="comma-separated keys clients must send as 'Authorization: Bearer KEY' "
        "(default: $CHATFABRIC_API_KEYS; empty: no authentication)",
    )
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (default: 4 MiB)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may queue and run (default: %(default)s)")
    g.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=15.0,
        help="seconds of silence on a started request before it fails with 504, while its worker is alive "
        "(default: %(default)s)",
    )
    g.add_argument("--liveness-timeout", type=float, default=3.0,
                   help="seconds without a worker's liveness beat (at least 3 of its heartbeat intervals) before "
                   "its started requests fail with 504 worker_timeout (default: %(default)s)")
    g.add_argument("--max-prompts", type=int, default=32,
                   help="prompts allowed in one /v1/completions request (default: %(default)s)")
    g.add_argument("--max-choices", type=int, default=64,
                   help="completions (prompts x n) allowed in one request (default: %(default)s)")
    g.add_argument("--drain-timeout", type=float, default=10.0,
                   help="seconds responses in progress get to finish when the gateway stops (default: %(default)s)")


def config_from_args(args) -> GatewayConfig:
    return GatewayConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(k.strip() for k in args.api_keys.split(",") if k.strip()),
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        liveness_timeout=args.liveness_timeout,
        max_prompts=args.max_prompts,
        max_choices=args.max_choices,
        shutdown_grace=args.drain_timeout,
    )


async def run(args, stop: asyncio.Event) -> None:
    """Serve the OpenAI API on the fabric until `stop` is set."""
    config = config_from_args(args)
    async with connect_from_args(args, "gateway", stop, role="gateway") as bus:
        await serve(bus, config, stop)
