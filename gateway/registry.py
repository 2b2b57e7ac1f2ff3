"""The gateway's view of live workers: a watch on the `workers` KV bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..proto.bus import Bus
from ..proto.messages import MessageError, WorkerCard, decode

log = logging.getLogger(__name__)

REMEMBER_MODELS = 3600.0  # seconds a model stays "known" after its last worker went away


class Registry:
    def __init__(self, bus: Bus):
        self._bus = bus
        self._cards: dict[str, WorkerCard] = {}
        self._last_seen: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch_forever(), name="registry-watch")
        await asyncio.wait_for(self.ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch_forever(self) -> None:
        while True:
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # lost connection or watcher error: watch again
                log.warning("registry watch failed (%s); retrying", err)
                await asyncio.sleep(1.0)

    async def _watch(self) -> None:
        watcher = await self._bus.registry.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are all in
                    self.ready.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._forget(entry.key)
                    continue
                try:
                    card = decode(WorkerCard, entry.value)
                except MessageError as err:
                    log.warning("ignored worker card %r: %s", entry.key, err)
                    continue
                self._cards[entry.key] = card
                self.ready.set()
        finally:
            await watcher.stop()

    def _forget(self, worker_id: str) -> None:
        card = self._cards.pop(worker_id, None)
        if card is not None:
            for model in card.models:
                self._last_seen[model.name] = time.time()

    def live_cards(self) -> list[WorkerCard]:
        now = time.time()
        for worker_id, card in list(self._cards.items()):
            if not card.alive(now):
                self._forget(worker_id)
        return list(self._cards.values())

    def models(self) -> dict[str, list[WorkerCard]]:
        """Every model with at least one live worker, and those workers."""
        out: dict[str, list[WorkerCard]] = {}
        for card in self.live_cards():
            for model in card.models:
                out.setdefault(model.name, []).append(card)
        return out

    def recently_served(self, model: str) -> bool:
        seen = self._last_seen.get(model)
        return seen is not None and time.time() - seen < REMEMBER_MODELS
