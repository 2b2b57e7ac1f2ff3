"""Opening and closing one NATS connection: its callbacks (disconnects, reconnects, and a close
for good, which `ConnectionWatch` reports), the servers of a URL list, and a bounded drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS

log = logging.getLogger("chatfabric.proto.bus")

DRAIN_TIMEOUT = 5.0


@dataclass
class ConnectionWatch:
    """What the NATS client's callbacks tell the rest of the process: reconnections (to
    `listeners`) and a close for good (to `on_lost`, unless we are closing it ourselves)."""

    name: str
    on_lost: Callable[[str], None] | None = None
    listeners: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    closing: bool = False


def server_urls(url: str) -> list[str]:
    """The servers of a URL that may list a cluster's nodes: `nats://a:4222,nats://b:4222`."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no NATS server in {url!r}")
    return urls


async def open_connection(url: str, watch: ConnectionWatch, **options) -> NATS:
    """Connect with endless reconnects; a lost connection is logged, never fatal. `url` may list
    several servers separated by commas (a cluster's nodes): the client connects to one, and on
    losing it reconnects to another (and to nodes the cluster announces)."""
    name = watch.name
    nc = NATS()
    servers = server_urls(url)

    async def on_error(err: Exception) -> None:
        log.warning("nats %s: %s", name, err)

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats %s: disconnected from %s, reconnecting", name, url)

    async def on_reconnect() -> None:
        log.info("nats %s: reconnected", name)
        for callback in watch.listeners:
            await callback()

    async def on_closed() -> None:
        if not watch.closing and watch.on_lost is not None:
            watch.on_lost(str(nc.last_error or "closed by the server"))

    await nc.connect(
        servers if len(servers) > 1 else servers[0],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1.0,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        closed_cb=on_closed,
        **options,
    )
    return nc


async def close_connection(nc: NATS, watch: ConnectionWatch | None = None, timeout: float = DRAIN_TIMEOUT) -> None:
    """Drain (deliver what is buffered, then close) within `timeout`; close at once otherwise."""
    if watch is not None:
        watch.closing = True
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except Exception as err:  # draining a broken connection: closing is all that is left
        log.debug("drain failed (%s); closing", err)
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout)


async def probe_consumer(url: str, auth, stream: str, name: str, *, looks: int = 3,
                         interval: float = 1.0) -> str | None:
    """One connection, no reconnects: None when someone pulls from (or works on deliveries of)
    the durable consumer `name` within `looks` look-ups `interval` apart, else why not. The
    connection joins as `auth`'s user (its role's inbox), which may look up its own consumer."""
    from nats.js.errors import NotFoundError

    role = auth.user or "admin"
    nc = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0, **auth.connect_options(role))
    try:
        js = nc.jetstream(timeout=3)
        for look in range(looks):
            try:
                info = await js.consumer_info(stream, name)
            except NotFoundError:
                return f"no consumer {name} on {stream} yet"
            if info.num_waiting or info.num_ack_pending:
                return None
            if look + 1 < looks:
                await asyncio.sleep(interval)
        return f"nobody pulls from {stream}/{name}"
    finally:
        await nc.close()
