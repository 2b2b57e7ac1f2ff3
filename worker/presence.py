"""A worker's presence on the fabric: its card in the `workers` registry and its liveness beats.

The card is put when the worker starts, again on every change of load, at least every ttl/3,
and at once after a reconnect (it may have expired while NATS was down). It is deleted when the
worker withdraws, at the start of a shutdown, so gateways stop counting it while it drains, and
again on the way out. Liveness beats go out every heartbeat interval until the process exits,
drain included: a gateway fails a started request within seconds when they stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import os
import socket
import time
from typing import Callable

from ..proto.bus import Bus
from ..proto.messages import AliveMessage, ModelCard, WorkerCard
from .backend import Backend
from .config import WorkerConfig


log = logging.getLogger(__name__)

CARD_DEBOUNCE = 0.1  # seconds between two card puts when load changes often


@functools.cache
def version() -> str:
    """The installed chatfabric's version (read once: reading package metadata scans the path)."""
    try:
        return importlib.metadata.version("chatfabric")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Presence:
    """Keeps one worker's card and beats going; `async with` it for the worker's lifetime."""

    def __init__(self, bus: Bus, config: WorkerConfig, backend: Backend, in_flight: Callable[[], int]):
        self.bus = bus
        self.config = config
        self.backend = backend
        self.in_flight = in_flight
        self.host = socket.gethostname()
        self.started_at = time.time()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def card(self) -> WorkerCard:
        return WorkerCard(
            worker_id=self.config.worker_id,
            models=(ModelCard(name=self.config.model_name, context_length=self.backend.context_length),),
            backend=self.backend.kind,
            device=self.backend.device,
            capacity=self.config.max_concurrency,
            in_flight=self.in_flight(),
            version=version(),
            host=self.host,
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            ttl=self.bus.config.registry_ttl,
            heartbeat_interval=self.config.heartbeat_interval,
            # backends that manage their own cache (vLLM) have no budget to report
            kv_cache_tokens=getattr(self.backend, "kv_cache_tokens", None),
            kv_free_tokens=self.backend.kv_free_tokens if hasattr(self.backend, "kv_cache_tokens") else None,
        )

    def changed(self) -> None:
        """The load changed: put the card again soon."""
        self._changed.set()

    async def __aenter__(self) -> "Presence":
        await self.bus.put_card(self.card(), joining=True)
        self.bus.on_reconnect(self._announce)
        self._tasks = [
            asyncio.create_task(self._refresh_card(), name="card"),
            asyncio.create_task(self._beat(), name="alive"),
        ]
        return self

    async def withdraw(self) -> None:
        """Stop putting the card and delete it: the worker takes no more work."""
        self._tasks[0].cancel()
        with contextlib.suppress(Exception):  # a closed connection has nothing to delete
            await self.bus.delete_card(self.config.worker_id)

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await self.withdraw()

    async def _announce(self) -> None:
        self._changed.set()

    async def _refresh_card(self) -> None:
        period = self.bus.config.registry_ttl / 3
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=period)
            self._changed.clear()
            try:
                await self.bus.put_card(self.card())
            except Exception as err:  # a lost connection must not kill the worker
                log.warning("registry refresh failed: %s", err)
            await asyncio.sleep(CARD_DEBOUNCE)

    async def _beat(self) -> None:
        while True:
            try:
                await self.bus.publish_alive(AliveMessage(worker_id=self.config.worker_id, in_flight=self.in_flight()))
            except Exception as err:
                log.debug("liveness beat failed: %s", err)
            await asyncio.sleep(self.config.heartbeat_interval)
