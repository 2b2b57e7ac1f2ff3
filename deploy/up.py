"""`chatfabric up`: NATS (embedded, or the fabric at $NATS_URL), a gateway and a worker in one
process on one machine. It composes the gateway's and the worker's own flags and runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
from pathlib import Path

from ..gateway import cli as gateway_cli
from ..proto.auth import (
    CREDENTIALS_FILE,
    NatsAuth,
    auth_from_args,
    binds_beyond_loopback,
    ensure_credentials,
    join_instructions,
    render_authorization,
)
from ..proto.bus import BusConfig, connect
from ..proto.embedded import EmbeddedServer
from ..worker import cli as worker_cli

log = logging.getLogger("chatfabric")


def data_dir() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "chatfabric"


def add_args(p: argparse.ArgumentParser) -> None:
    gateway_cli.add_args(p)
    worker_cli.add_args(p)
    p.add_argument("--data-dir", type=Path, default=data_dir(), help="embedded NATS storage (default: %(default)s)")
    p.add_argument("--nats-host", default="127.0.0.1",
                   help="address the embedded NATS server listens on (default: %(default)s, this machine only); "
                   "beyond loopback (e.g. 0.0.0.0, for workers on other machines) it requires credentials, "
                   "generated once into DATA_DIR/nats/nats-credentials.json")
    p.add_argument("--nats-port", type=int, help="port of the embedded NATS server (default: 4222 when free)")


async def run(args, stop: asyncio.Event) -> None:
    """Run a gateway and a worker on one connection until `stop` is set."""
    from ..gateway.app import serve
    from ..worker.service import Worker

    gw_config = gateway_cli.config_from_args(args)
    backend, prompts, wk_config = await worker_cli.load(args)
    try:
        async with embedded_or_joined(args) as (bus_config, auth, joining):
            async with connect(bus_config, "chatfabric-up", stop, auth=auth, role="admin") as bus:
                worker = asyncio.create_task(Worker(bus, backend, prompts, wk_config).run(stop), name="worker")
                gateway = asyncio.create_task(serve(bus, gw_config, stop), name="gateway")
                await asyncio.sleep(0.5)
                if not (worker.done() or gateway.done()):
                    print_banner(gw_config, bus.nc.connected_url, wk_config.model_name, joining)
                await asyncio.wait([worker, gateway], return_when=asyncio.FIRST_EXCEPTION)
                stop.set()
                await asyncio.gather(worker, gateway)
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def embedded_or_joined(args):
    """(bus config, credentials, how remote workers join) for `up`: the fabric at --nats-url /
    $NATS_URL when one is named (said loudly: `up` then adds to someone else's fabric), else an
    embedded server, which requires generated credentials when it listens beyond loopback."""
    bus_config = BusConfig.from_env(url=args.nats_url, store_dir=args.data_dir / "nats")
    if bus_config.url:
        source = "--nats-url" if args.nats_url != os.environ.get("NATS_URL") else "$NATS_URL"
        log.warning("joining the existing fabric at %s (from %s) instead of starting a NATS server; "
                    "unset NATS_URL to run everything here", bus_config.url, source)
        yield bus_config, auth_from_args(args), f"joined the existing fabric at {bus_config.url} (from {source})"
        return
    store = args.data_dir / "nats"
    server = EmbeddedServer(host=args.nats_host, port=args.nats_port, store_dir=store)
    auth, joining = NatsAuth(), None
    if binds_beyond_loopback(args.nats_host):
        passwords = ensure_credentials(store)
        server.authorization = render_authorization(passwords)
        auth = NatsAuth.for_role("admin", passwords)
    await asyncio.to_thread(server.start)
    try:
        if server.authorization is not None:
            joining = join_instructions(server.url, passwords, store / CREDENTIALS_FILE)
        yield dataclasses.replace(bus_config, url=server.url), auth, joining
    finally:
        await asyncio.to_thread(server.stop)


def print_banner(config, nats_url, model: str, joining: str | None) -> None:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    base = f"http://{host}:{config.port}/v1"
    nats = f"{nats_url.scheme}://{nats_url.hostname}:{nats_url.port}"
    auth = ' -H "Authorization: Bearer $KEY"' if config.api_keys else ""
    if joining is None:
        joining = (f"NATS listens on this machine only ({nats}). To add workers on other machines, start with "
                   f"--nats-host 0.0.0.0: credentials are generated and printed here.")
    print(
        f"\nchatfabric is up: OpenAI-compatible API at {base} (model '{model}'), NATS at {nats}\n"
        f"Try it:\n  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{{\"model\": \"{model}\", \"temperature\": 0, "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
        f"{joining}\n"
        f"Press Ctrl-C to stop.\n",
        flush=True,
    )
