"""Pulling from a durable consumer: the one fetch loop of the fabric (`Pull.batches`), which the
job runner (workers, judges, trainers) and the leaderboard follower run on, and `Delivery`, one
pulled message with its place in the stream and the ways to settle it. Components get these
from `Bus`; the nats-py objects stay inside them. (`proto/replay.py` reads whole streams through
its own ephemeral consumers: a read, not a pull of work.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

import nats.errors
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

log = logging.getLogger(__name__)


class Delivery:
    """One message as a pull consumer delivered it."""

    __slots__ = ("_msg",)

    def __init__(self, msg):
        self._msg = msg

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def seq(self) -> int:
        """Its sequence in the stream."""
        return self._msg.metadata.sequence.stream

    @property
    def delivered(self) -> int:
        """1 for the first delivery, 2 for the first redelivery, ..."""
        return self._msg.metadata.num_delivered

    @property
    def ack_subject(self) -> str:
        """Where its acks go (a gateway naks a dead worker's delivery there)."""
        return self._msg.reply

    @property
    def stored_at(self) -> float | None:
        """When JetStream stored it (unix seconds)."""
        stamp = getattr(self._msg.metadata, "timestamp", None)
        return stamp.timestamp() if stamp is not None else None

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()


class Pull:
    """A process's binding to one durable pull consumer."""

    def __init__(self, psub: JetStreamContext.PullSubscription, name: str):
        self._psub = psub
        self.name = name  # for log lines: "generation", "judge", "leaderboard", ...

    async def fetch(self, room: int, wait: float) -> list[Delivery]:
        """Up to `room` messages, waiting at most `wait` seconds for the first. A server that is
        away or electing a leader gives none (the connection reconnects by itself; the consumer
        is durable and resumes); a connection closed for good raises."""
        try:
            return [Delivery(msg) for msg in await self._psub.fetch(room, timeout=wait)]
        except (asyncio.TimeoutError, NatsTimeout):
            return []
        except (ServiceUnavailableError, NoRespondersError) as err:
            # JetStream has no leader for the consumer right now (a cluster electing one after
            # losing a node, or one just created): nothing to take yet, ask again shortly
            log.debug("%s: fetch not answered (%s); asking again", self.name, type(err).__name__)
            await asyncio.sleep(min(0.2, wait))
            return []
        except nats.errors.ConnectionClosedError:
            raise
        except nats.errors.Error as err:
            log.warning("%s: pulling failed (%s); retrying", self.name, err or type(err).__name__)
            await asyncio.sleep(wait)
            return []

    async def batches(self, stop: asyncio.Event, room: Callable[[], int], wait: float,
                      room_freed: asyncio.Event | None = None) -> AsyncIterator[list[Delivery]]:
        """Fetch as many as `room()` says there is room for, batch after batch, until `stop`; with
        no room, wait for `room_freed` (or `stop`). An empty batch is a `wait` that passed."""
        while not stop.is_set():
            n = room()
            if n == 0:
                if room_freed is None:
                    raise ValueError("room() is 0 and there is no room_freed event to wait for")
                room_freed.clear()
                await wait_any(room_freed, stop)
                continue
            yield await self.fetch(n, wait)

    async def unsubscribe(self) -> None:
        with contextlib.suppress(nats.errors.Error):  # a closed connection has nothing to undo
            await self._psub.unsubscribe()


async def wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
