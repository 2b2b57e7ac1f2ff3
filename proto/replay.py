"""Ordered reads of an event-plane stream, as validated messages.

`replay(bus, Vote)` reads every vote from the first one up to the stream's tail as of the call;
`start_seq` / `start_time` start later, `until` stops at a time. Each item carries the message's
stream sequence and timestamp. A message that does not validate is logged with its sequence,
counted, passed to `on_invalid` and skipped: one bad record never stops a leaderboard.

A replay is one ephemeral pull consumer without acks (nothing is removed or acknowledged),
read in batches of 1,000, the next requested while the reader works through the last: memory
stays bounded however long the stream (per-message fetches would cost a round trip each). If the consumer disappears (a server restart, a long pause of the reader) the replay
recreates it after the last sequence it read, so nothing is lost or read twice. Work-queue
streams (GEN, JOBS) are refused: a consumer there would take messages from their workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, Generic, NamedTuple, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ValidationError

from .contract import missing_stream
from .messages import explain

if TYPE_CHECKING:
    from .bus import Bus

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

BATCH = 1000  # messages per pull request
EXPIRES_SECONDS = 2.0  # a pull request the server has nothing for ends (408) after this long
STALL_SECONDS = 5.0  # ...and no answer at all this long after that: the consumer or server is gone
RESUME_SECONDS = 30.0  # how long to try recreating the consumer before giving up
# An ephemeral consumer the server removes once nobody asked it for messages this long.
INACTIVE_THRESHOLD = 300.0
_END_OF_REQUEST = {"404", "408"}  # no messages (left) for one request


class ReplayError(ConnectionError):
    """The replay could not go on (JetStream stayed unreachable); `last_seq` says how far it got."""


class Replayed(NamedTuple, Generic[M]):
    """One message of a replay (a tuple: a million of them are made cheaply)."""

    seq: int  # the message's sequence in its stream
    time: float  # when JetStream stored it (unix time)
    subject: str
    message: M


@dataclass(frozen=True)
class Invalid:
    """A stored message that does not validate as the replay's model."""

    seq: int
    time: float
    subject: str
    reason: str
    data: bytes


def _unix(when: float | datetime.datetime | None) -> float | None:
    return when.timestamp() if isinstance(when, datetime.datetime) else when


def _position(reply: str) -> tuple[int, int, int]:
    """(stream sequence, timestamp in ns, messages pending) from a JetStream delivery's reply
    subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<seq>.<cseq>.<ns>.<pending>`, or the
    form with domain and account hash (two tokens more) and a trailing random token."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[7]), int(tokens[8])
    return int(tokens[7]), int(tokens[9]), int(tokens[10])


class Replay(Generic[M]):
    """`async for item in replay(...)`; afterwards `delivered`, `invalid` and `last_seq` say
    what was read. Iterate it once (leaving early: `contextlib.aclosing(aiter(r))`)."""

    def __init__(self, bus: "Bus", model_type: type[M], stream: str, subject_filter: str, *,
                 start_seq: int | None, start_time: float | datetime.datetime | None,
                 until: float | datetime.datetime | None, on_invalid: Callable[[Invalid], None] | None,
                 batch: int):
        if start_seq is not None and start_time is not None:
            raise ValueError("give start_seq or start_time, not both")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.bus, self.model_type, self.stream, self.subject_filter = bus, model_type, stream, subject_filter
        self.start_seq, self.start_time, self.until = start_seq, _unix(start_time), _unix(until)
        self.on_invalid = on_invalid
        self.batch = batch
        self.delivered = 0
        self.invalid = 0
        self.last_seq = 0  # the last sequence read, valid or not

    def __aiter__(self) -> AsyncIterator[Replayed[M]]:
        return self._run()

    async def _run(self) -> AsyncIterator[Replayed[M]]:
        tail = await self._tail()
        puller = _Puller(self.bus, self.stream, self.batch)
        validate = self.model_type.model_validate_json  # the loop below runs a million times
        until = math.inf if self.until is None else self.until
        try:
            if tail == 0 or not await self._open(puller):
                return
            while (msgs := await self._take(puller)) is not None:
                for msg in msgs:
                    seq, ns, pending = _position(msg.reply)
                    at = ns / 1e9
                    if seq > tail or at > until:
                        return
                    self.last_seq = seq
                    try:
                        message = validate(msg.data)
                    except ValidationError as err:
                        self._reject(Invalid(seq, at, msg.subject, explain(err), msg.data))
                    else:
                        self.delivered += 1
                        yield Replayed(seq, at, msg.subject, message)
                    if seq >= tail or pending == 0:
                        return
        finally:
            await puller.close()

    async def _tail(self) -> int:
        """The stream's last sequence now: the replay ends there (0: nothing to read)."""
        try:
            info = await self.bus.js.stream_info(self.stream)
        except NotFoundError:
            raise missing_stream(self.stream) from None
        if info.config.retention in (api.RetentionPolicy.WORK_QUEUE, api.RetentionPolicy.WORK_QUEUE.value):
            raise ValueError(f"{self.stream} is a work queue: a replay would take its messages from its workers")
        return info.state.last_seq

    def _consumer(self) -> api.ConsumerConfig:
        """Where to start: after the last sequence read once there is one, else as asked."""
        config = api.ConsumerConfig(
            filter_subject=self.subject_filter, ack_policy=api.AckPolicy.NONE, mem_storage=True,
            num_replicas=1, inactive_threshold=INACTIVE_THRESHOLD, deliver_policy=api.DeliverPolicy.ALL,
        )
        start_seq = self.last_seq + 1 if self.last_seq else self.start_seq
        if start_seq is not None:
            return config.evolve(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        if self.start_time is not None:
            start = datetime.datetime.fromtimestamp(self.start_time, datetime.timezone.utc)
            return config.evolve(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=start)
        return config

    async def _open(self, puller: "_Puller") -> bool:
        """Create the consumer; False when it has nothing to deliver."""
        info = await self.bus.js.add_consumer(self.stream, config=self._consumer())
        await puller.start(info.name)
        return info.num_pending > 0

    async def _take(self, puller: "_Puller") -> list[Msg] | None:
        """The messages that arrived; None once the consumer has nothing left. Recreates the
        consumer after `last_seq` when it stalls, for up to RESUME_SECONDS."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RESUME_SECONDS
        while not puller.exhausted:
            try:
                msgs, ended_short = await puller.take()
                if ended_short:  # the end, unless messages remain (the request merely expired)
                    info = await self.bus.js.consumer_info(self.stream, puller.consumer)
                    puller.exhausted = info.num_pending == 0
                if msgs:
                    return msgs
            except (_Stalled, NotFoundError, *_RETRYABLE) as err:
                if self.bus.nc.is_closed or loop.time() > give_up:
                    raise ReplayError(f"replay of {self.stream} stopped after sequence {self.last_seq}: "
                                      f"{err or type(err).__name__}") from None
                log.warning("replay of %s: %s; resuming after sequence %d", self.stream,
                            err or type(err).__name__, self.last_seq)
                await self._reopen(puller)
        return None

    async def _reopen(self, puller: "_Puller") -> None:
        await puller.close()
        await asyncio.sleep(0.2)
        with contextlib.suppress(*_RETRYABLE):  # still unreachable: the next stall tries again
            puller.exhausted = not await self._open(puller)

    def _reject(self, bad: Invalid) -> None:
        self.invalid += 1
        log.warning("replay of %s: skipped sequence %d on %s, not a valid %s: %s",
                    self.stream, bad.seq, bad.subject, self.model_type.__name__, bad.reason)
        if self.on_invalid is not None:
            self.on_invalid(bad)


class _Stalled(Exception):
    """No answer to a pull request, or the consumer is gone."""


_RETRYABLE = (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.NoRespondersError,
              nats.errors.ConnectionReconnectingError)


class _Puller:
    """Pulls one consumer `batch` messages at a time, one request open at a time. The next
    request goes out as soon as the open one is complete (a full batch, or a status that ends
    it) and no more than one batch waits unread, so it is on its way while the reader works
    through the previous one, and only a few batches are ever held."""

    def __init__(self, bus: "Bus", stream: str, batch: int):
        self.nc, self.stream, self.batch = bus.nc, stream, batch
        self.ready: deque[Msg] = deque()
        self.arrived = asyncio.Event()
        self.sub = None
        self.consumer = ""
        self.open = False  # a request is being answered
        self.received = 0  # messages received for the open request
        self.exhausted = False  # the consumer has nothing left to deliver
        self.request = json.dumps({"batch": batch, "expires": int(EXPIRES_SECONDS * 1e9)}).encode()

    async def start(self, consumer: str) -> None:
        self.ready.clear()
        self.open = False
        self.consumer = consumer
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.inbox, cb=self._arrive)

    async def _arrive(self, msg: Msg) -> None:
        if msg.reply:
            self.received += 1
            if self.received < self.batch:
                self.ready.append(msg)
                self.arrived.set()
                return
        elif _status(msg) == "100":
            return  # a heartbeat: nothing to read
        self.open = False
        self.ready.append(msg)
        self.arrived.set()
        if msg.reply and len(self.ready) <= self.batch:
            await self._request()  # the reader keeps up: the next batch comes while it reads

    async def _request(self) -> None:
        self.open, self.received = True, 0
        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}", self.request,
                              reply=self.inbox)

    async def take(self) -> tuple[list[Msg], bool]:
        """(the messages that arrived, waiting for one if none did; whether a request ended
        short of a full batch: no messages were left for it)."""
        while not self.ready:
            if not self.open:
                await self._request()
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), EXPIRES_SECONDS + STALL_SECONDS)
            except asyncio.TimeoutError:
                raise _Stalled(f"no answer from its consumer for {EXPIRES_SECONDS + STALL_SECONDS:g} s") from None
        msgs = []
        while self.ready:
            msg = self.ready.popleft()
            if msg.reply:
                msgs.append(msg)
            elif _status(msg) in _END_OF_REQUEST:
                return msgs, True
            else:
                raise _Stalled(f"JetStream answered {_status(msg)} {(msg.headers or {}).get('Description', '')}".strip())
        if not self.open:
            await self._request()
        return msgs, False

    async def close(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await sub.unsubscribe()
            except nats.errors.Error as err:  # a closed connection has nothing to undo
                log.debug("replay: unsubscribe failed: %s", err)


def _status(msg: Msg) -> str:
    return (msg.headers or {}).get("Status", "")


def replay(bus: "Bus", model_type: type[M], subject_filter: str | None = None, *, stream: str | None = None,
           start_seq: int | None = None, start_time: float | datetime.datetime | None = None,
           until: float | datetime.datetime | None = None, on_invalid: Callable[[Invalid], None] | None = None,
           batch: int = BATCH) -> Replay[M]:
    """Read `stream` (default: the model's `STREAM`) through `subject_filter` (default: its
    `SUBJECTS`) from the first message, from `start_seq`, or from `start_time`, up to the tail
    as of the call or up to `until` (unix time or datetime), as `Replayed[model_type]` items."""
    stream = stream or getattr(model_type, "STREAM", None)
    subject_filter = subject_filter or getattr(model_type, "SUBJECTS", None)
    if stream is None or subject_filter is None:
        raise ValueError(f"{model_type.__name__} names no stream: give stream and subject_filter")
    return Replay(bus, model_type, stream, subject_filter, start_seq=start_seq, start_time=start_time,
                  until=until, on_invalid=on_invalid, batch=batch)
