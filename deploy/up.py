"""`chatfabric up`: NATS (embedded, or the fabric at $NATS_URL), a gateway, a worker per model
and the arena web UI, in one process on one machine. It composes the components' own flags and
runs; it adds none of its own behaviour beyond starting them together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
from pathlib import Path

from ..arena import config as arena_settings
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
from .extras import install_hint, missing
from ..worker import cli as worker_cli

log = logging.getLogger("chatfabric")


def data_dir() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "chatfabric"


def add_args(p: argparse.ArgumentParser) -> None:
    gateway_cli.add_args(p)
    worker_cli.add_args(p, several=True)
    arena_settings.add_ui_args(p)
    p.add_argument("--no-arena", dest="arena", action="store_false", help="do not start the arena web UI")
    p.add_argument("--arena-host", default="127.0.0.1", help="address the arena listens on (default: %(default)s)")
    p.add_argument("--arena-port", type=int, default=arena_settings.DEFAULT_PORT,
                   help="the arena's HTTP port (default: %(default)s)")
    p.add_argument("--snapshot-interval", type=float, default=10.0,
                   help="with the arena, the leaderboard follower publishes a snapshot at most this often, "
                   "in seconds (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=data_dir(), help="embedded NATS storage (default: %(default)s)")
    p.add_argument("--nats-host", default="127.0.0.1",
                   help="address the embedded NATS server listens on (default: %(default)s, this machine only); "
                   "beyond loopback (e.g. 0.0.0.0, for workers on other machines) it requires credentials, "
                   "generated once into DATA_DIR/nats/nats-credentials.json")
    p.add_argument("--nats-port", type=int, help="port of the embedded NATS server (default: 4222 when free)")


async def run(args, stop: asyncio.Event) -> None:
    """Run a gateway, a worker per model and the arena on one connection until `stop` is set."""
    from ..gateway.app import serve
    from ..worker.service import Worker

    gw_config = gateway_cli.config_from_args(args)
    arena_config = arena_config_from_args(args, gw_config) if args.arena and arena_installed() else None
    arena_socket = arena_settings.bind(arena_config.host, arena_config.port) if arena_config else None
    async with contextlib.AsyncExitStack() as stack:
        if arena_socket is not None:
            stack.callback(arena_socket.close)
        workers = []
        for model_args in worker_cli.models_from_args(args):
            backend, prompts, wk_config = await worker_cli.load(model_args)
            stack.push_async_callback(backend.close)
            workers.append((backend, prompts, wk_config))
        bus_config, auth, joining = await stack.enter_async_context(embedded_or_joined(args))
        bus = await stack.enter_async_context(connect(bus_config, "chatfabric-up", stop, auth=auth, role="admin"))
        tasks = [asyncio.create_task(Worker(bus, *worker).run(stop), name=f"worker {worker[2].model_name}")
                 for worker in workers]
        tasks.append(asyncio.create_task(serve(bus, gw_config, stop), name="gateway"))
        if arena_config is not None:
            from ..arena import ui

            tasks.append(asyncio.create_task(ui.serve(bus, arena_config, stop, sock=arena_socket), name="arena"))
            if args.nats_url:  # someone else's fabric: it may have its follower already
                log.info("joined fabric: not starting a leaderboard follower (run `chatfabric leaderboard --follow` "
                         "once per fabric)")
            else:
                tasks.append(asyncio.create_task(follow_leaderboard(bus, args, stop), name="leaderboard"))
        await asyncio.sleep(0.5)
        if not any(task.done() for task in tasks):
            arena_url = f"http://{_shown(arena_config.host)}:{arena_config.port}/" if arena_config else None
            print_banner(gw_config, bus.connected_url, [w[2].model_name for w in workers], joining, arena_url)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        await asyncio.gather(*tasks)


def arena_installed() -> bool:
    """Whether the arena's extra is here; without it `up` leaves the arena out and says so."""
    absent = missing("arena")
    if absent:
        log.warning("the arena is left out: its extra is not installed (no %s); %s adds it",
                    ", ".join(absent), install_hint("arena"))
    return not absent


async def follow_leaderboard(bus, args, stop: asyncio.Event) -> None:
    """The arena's Leaderboard tab reads the snapshots of one follower per fabric: this one."""
    import importlib

    # numpy and scipy take seconds to import: off the event loop
    await asyncio.to_thread(importlib.import_module, "chatfabric.arena.feed")
    from ..arena.feed import FollowOptions, follow

    await follow(bus, FollowOptions(snapshot_interval=args.snapshot_interval), stop)


def arena_config_from_args(args, gw_config) -> arena_settings.ArenaConfig:
    """The arena of `up` talks to this process's gateway, with its first API key if it has any."""
    gateway_url = f"http://{_shown(gw_config.host)}:{gw_config.port}/v1"
    key = next(iter(gw_config.api_keys), None) if gw_config.api_keys else None
    return arena_settings.ui_config(args, host=args.arena_host, port=args.arena_port, gateway_url=gateway_url, api_key=key)


def _shown(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


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


def print_banner(config, nats_url, models: list[str], joining: str | None, arena_url: str | None = None) -> None:
    base = f"http://{_shown(config.host)}:{config.port}/v1"
    nats = f"{nats_url.scheme}://{nats_url.hostname}:{nats_url.port}"
    auth = ' -H "Authorization: Bearer $KEY"' if config.api_keys else ""
    model = models[0]
    served = f"model '{model}'" if len(models) == 1 else "models " + ", ".join(f"'{m}'" for m in models)
    if joining is None:
        joining = (f"NATS listens on this machine only ({nats}). To add workers on other machines, start with "
                   f"--nats-host 0.0.0.0: credentials are generated and printed here.")
    arena = f"Arena (web chat, battles, leaderboard): {arena_url}\n" if arena_url else ""
    print(
        f"\nchatfabric is up: OpenAI-compatible API at {base} ({served}), NATS at {nats}\n"
        f"{arena}"
        f"Try it:\n  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{{\"model\": \"{model}\", \"temperature\": 0, "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
        f"{joining}\n"
        f"Press Ctrl-C to stop.\n",
        flush=True,
    )
