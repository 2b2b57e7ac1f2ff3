"""Token-plane fan-in: one subscription on this gateway's reply inbox, one mailbox per request
(the pattern of vLLM's output handler). Workers send batches of chunks of many requests
(`proto/outbox.py`); each chunk goes to its request's mailbox, and the request's task takes
everything that arrived since it last looked in one wake. One ticker wakes every waiting
request each `TICK` seconds, so that it can check its deadline and its worker's liveness
without a timer of its own per wait."""

from __future__ import annotations

import asyncio

from ..proto import subjects
from ..proto.bus import Bus
from ..proto.messages import Chunk


class Mailbox:
    """One request's chunks as they arrive; `take` returns all of them at once."""

    __slots__ = ("_items", "_waiter")

    def __init__(self):
        self._items: list[Chunk] = []
        self._waiter: asyncio.Future | None = None

    def put(self, chunk: Chunk) -> None:
        self._items.append(chunk)
        self.wake()

    async def take(self) -> list[Chunk]:
        """Everything that arrived; waits for something or the next tick ([] then)."""
        if not self._items:
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items

    def wake(self) -> None:
        """Let the waiting task look (at the chunks, or at its deadline and worker on a tick)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


TICK = 0.25  # seconds between the checks of a waiting request's deadline and worker liveness


class Mailboxes:
    def __init__(self, bus: Bus, gateway_id: str):
        self._bus = bus
        self.gateway_id = gateway_id
        self.inbox = subjects.reply_inbox(gateway_id)
        self._boxes: dict[str, Mailbox] = {}
        self._sub = None
        self._ticker: asyncio.Task | None = None

    async def start(self) -> None:
        self._sub = await self._bus.subscribe_replies(self.gateway_id, self._on_chunks)
        self._ticker = asyncio.create_task(self._tick(), name="mailbox ticker")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for box in list(self._boxes.values()):
                box.wake()

    def open(self, request_id: str) -> Mailbox:
        box = self._boxes[request_id] = Mailbox()
        return box

    def close(self, request_id: str) -> None:
        self._boxes.pop(request_id, None)

    def _on_chunks(self, chunks: list[Chunk]) -> None:
        boxes = self._boxes
        for chunk in chunks:
            box = boxes.get(chunk.request_id)
            if box is not None:  # else the request is gone (finished, cancelled or timed out)
                box.put(chunk)
