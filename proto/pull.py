"""Pulling from a durable consumer: the one pull loop of the fabric (`Pull.batches`), which the
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
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DEFAULT_PREFIX

log = logging.getLogger(__name__)

STATUS, DESCRIPTION, PENDING = "Status", "Description", "Nats-Pending-Messages"  # status headers
CONTROL = "100"  # an idle heartbeat or flow control: no request ended
EXPIRY_GRACE = 0.5  # seconds past a request's expiry after which its end status is presumed lost


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
    """A process's binding to one durable pull consumer: a subscription on an inbox of its own,
    and pull requests kept outstanding there for as many messages as its taker has room for (as
    nats.go's `Consume` does), so that a message stored while there is room is pushed at once and
    a busy taker costs one small request per turn in which room freed, not a fetch per batch.

    The count of messages asked for and not yet delivered is exact: each delivery takes one off,
    and the server ends every request that is not filled by its `expires` with a status that says
    how many it did not deliver. Requests lost without that status (a server restarted, a consumer
    with no leader) are known to be over once the last of them has expired."""

    def __init__(self, nc: NATS, stream: str, consumer: str, name: str, api_prefix: str = DEFAULT_PREFIX):
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.name = name  # for log lines: "generation", "judge", "leaderboard", ...
        self._sub: Subscription | None = None
        self._inbox = ""
        self._arrived: list[Msg] = []  # delivered, not yet taken by `batches`
        self._asked = 0  # messages the live pull requests may still deliver
        self._asked_until = 0.0  # loop time by which every pull request sent has expired
        self._wake = asyncio.Event()  # a delivery, a request's end, room freed or stop

    async def open(self) -> "Pull":
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        return self

    @property
    def asked(self) -> int:
        """Messages asked for and not delivered yet (the server may still send them)."""
        return self._asked

    def room_freed(self) -> None:
        """The taker has room again: ask for it now rather than at the next `wait`."""
        self._wake.set()

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is None:
            self._asked = max(0, self._asked - 1)
            self._arrived.append(msg)
            self._wake.set()
        elif status != CONTROL:  # a request ended: expired (408) or refused (409)
            unfilled = msg.headers.get(PENDING)
            if unfilled is not None:
                self._asked = max(0, self._asked - int(unfilled))
                self._wake.set()
            else:  # no count: the expiry below settles it
                log.debug("%s: pull request ended without a count: %s %s", self.name, status,
                          msg.headers.get(DESCRIPTION, ""))

    async def _ask(self, n: int, expires: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._nc.publish(self._next_subject, _pull_request(n, expires), reply=self._inbox)
        except nats.errors.ConnectionClosedError:
            raise
        except nats.errors.Error as err:  # away: the connection reconnects by itself
            log.warning("%s: pull request not sent (%s); retrying", self.name, err or type(err).__name__)
            return
        self._asked += n
        self._asked_until = max(self._asked_until, loop.time() + expires + EXPIRY_GRACE)

    def _forget_expired(self) -> None:
        if self._asked and asyncio.get_running_loop().time() > self._asked_until:
            log.debug("%s: %d asked for and never answered; asking again", self.name, self._asked)
            self._asked = 0

    async def batches(self, stop: asyncio.Event, room: Callable[[], int], wait: float) -> AsyncIterator[list[Delivery]]:
        """Deliveries, batch after batch, never more in hand at once than `room()` allows
        (`room()` counts what the taker already holds; call `room_freed` when it grows), until
        `stop`. An empty batch is a `wait` that passed with nothing delivered. At the end, the
        requests still outstanding are waited out (at most `wait`) and whatever they delivered is
        handed back to the consumer, so that no message waits for its ack timeout."""
        if self._sub is None:
            raise RuntimeError("Pull.open() first")
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())
        loop = asyncio.get_running_loop()
        due = loop.time() + wait  # of the next batch, empty if nothing arrives by then
        try:
            while not stop.is_set():
                self._forget_expired()
                want = room() - self._asked - len(self._arrived)
                if want > 0:
                    await self._ask(want, wait)
                if not self._arrived and loop.time() < due:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(due):
                            await self._wake.wait()
                    if not self._arrived and loop.time() < due:
                        continue  # room freed, a request ended, or stop: look again
                batch, self._arrived = [Delivery(msg) for msg in self._arrived], []
                due = loop.time() + wait
                yield batch
        finally:
            stopping.cancel()
            await self._close(wait)

    async def _close(self, wait: float) -> None:
        """Wait out the outstanding requests (until they are filled, or at most `wait` plus the
        grace), then nak all they delivered (only then: a nak while one is still open would
        deliver the message to it again) and leave the inbox."""
        loop = asyncio.get_running_loop()
        deadline = min(self._asked_until, loop.time() + wait + EXPIRY_GRACE)
        try:
            while self._asked and loop.time() < deadline and not self._nc.is_closed:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - loop.time()):
                        await self._wake.wait()
        finally:
            await self.unsubscribe()
            self._asked = 0
            arrived, self._arrived = self._arrived, []
            for msg in arrived:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()

    async def unsubscribe(self) -> None:
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        with contextlib.suppress(nats.errors.Error):  # a closed connection has nothing to undo
            await sub.unsubscribe()


def _pull_request(batch: int, expires: float) -> bytes:
    return b'{"batch":%d,"expires":%d}' % (batch, int(expires * 1e9))
