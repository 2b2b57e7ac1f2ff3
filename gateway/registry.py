"""The gateway's view of live workers: a watch on the `workers` KV bucket, plus the liveness
beats workers publish on `ctl.alive.<worker_id>`.

A card says what a worker serves; a beat says its process is alive right now. A worker counts as
alive while its card is fresh or it beat within the registry TTL, so a card that expired while
NATS restarted (the server places the TTL marker; the worker re-announces on reconnect) does not
make its model disappear. An explicit delete (a worker shutting down) removes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..proto.bus import Bus
from ..proto.messages import AliveMessage, MessageError, WorkerCard, decode

log = logging.getLogger(__name__)

REMEMBER_MODELS = 3600.0  # seconds a model stays "known" after its last worker went away
MISSED_BEATS = 3  # beats a worker may miss before a started request on it is failed


class Registry:
    def __init__(self, bus: Bus, liveness_timeout: float = 3.0):
        self._bus = bus
        self.min_liveness_timeout = liveness_timeout
        self._cards: dict[str, WorkerCard] = {}
        self._beats: dict[str, float] = {}  # worker id -> monotonic time of its last beat
        self._last_seen: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._beat_sub = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._beat_sub = await self._bus.subscribe_alive(self._on_beat)
        self._task = asyncio.create_task(self._watch_forever(), name="registry-watch")
        await asyncio.wait_for(self.ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._beat_sub is not None:
            await self._beat_sub.unsubscribe()

    async def _on_beat(self, alive: AliveMessage) -> None:
        self._beats[alive.worker_id] = time.monotonic()

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
        watcher = await (await self._bus.registry_bucket()).watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are all in
                    self.ready.set()
                    continue
                if entry.operation == "DEL":  # the worker deregistered itself
                    self._forget(entry.key)
                elif entry.operation == "PURGE" or not entry.value:  # expired by TTL
                    if not self._beat_recently(entry.key):
                        self._forget(entry.key)
                else:
                    self._store(entry.key, entry.value)
        finally:
            await watcher.stop()

    def _store(self, key: str, value: bytes) -> None:
        try:
            card = decode(WorkerCard, value)
        except MessageError as err:
            log.warning("ignored worker card %r: %s", key, err)
            return
        self._cards[key] = card
        self.ready.set()

    def _forget(self, worker_id: str) -> None:
        # its last beat stays: a request still bound to this worker must see it silent, not unknown
        card = self._cards.pop(worker_id, None)
        if card is not None:
            for model in card.models:
                self._last_seen[model.name] = time.time()

    def _beat_recently(self, worker_id: str) -> bool:
        card = self._cards.get(worker_id)
        silent = self.silence(worker_id)
        return card is not None and silent is not None and silent <= card.ttl

    # -- queries --------------------------------------------------------------------------

    def silence(self, worker_id: str | None) -> float | None:
        """Seconds since the worker's last liveness beat; None if it never beat (then only the
        per-request heartbeat timeout applies)."""
        last = self._beats.get(worker_id) if worker_id else None
        return None if last is None else time.monotonic() - last

    def liveness_timeout(self, worker_id: str | None) -> float:
        """Silence after which a worker counts as dead: MISSED_BEATS of its own beat interval,
        never less than the gateway's floor."""
        card = self._cards.get(worker_id) if worker_id else None
        interval = card.heartbeat_interval if card is not None else 1.0
        return max(self.min_liveness_timeout, MISSED_BEATS * interval)

    def live_cards(self) -> list[WorkerCard]:
        now = time.time()
        for worker_id, card in list(self._cards.items()):
            if not card.alive(now) and not self._beat_recently(worker_id):
                self._forget(worker_id)
        stale = time.monotonic() - REMEMBER_MODELS
        for worker_id in [w for w, t in self._beats.items() if t < stale and w not in self._cards]:
            del self._beats[worker_id]
        return list(self._cards.values())

    def models(self) -> dict[str, list[WorkerCard]]:
        """Every model with at least one live worker, and those workers."""
        out: dict[str, list[WorkerCard]] = {}
        for card in self.live_cards():
            for model in card.models:
                out.setdefault(model.name, []).append(card)
        return out

    def max_model_len(self, model: str) -> int:
        """The shortest context length among the model's live workers (a request must fit any)."""
        lengths = [m.context_length for card in self.models().get(model, ()) for m in card.models
                   if m.name == model]
        return min(lengths) if lengths else 1 << 31

    def recently_served(self, model: str) -> bool:
        seen = self._last_seen.get(model)
        return seen is not None and time.time() - seen < REMEMBER_MODELS
