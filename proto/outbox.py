"""The worker's side of the token plane: one message per gateway per engine step, not per token.

Each stream a worker serves writes its chunks to a `ReplyStream`, which numbers them and hands
them to the connection's `Outbox` without waiting. The outbox sends everything pending for one
reply inbox (one gateway) as one `ChunkBatch` message, once per event-loop turn: the tokens an
engine step produces for every running stream wake their streams in one turn, so they leave in
one message per gateway, however many streams there are.

With a `stream_interval`, deltas are also coalesced: after a send, new text waits up to that
long, a stream's consecutive deltas merging into one, so a stream faster than that costs one
chunk per interval. Nothing else waits: a stream's first delta, heartbeats, final and error
chunks are sent in the next turn, taking whatever is pending with them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS

from .messages import Chunk, DeltaChunk, ErrorChunk, FinalChunk, HeartbeatChunk, Usage, encode_chunks

log = logging.getLogger(__name__)


class _OpenDelta:
    """A delta not sent yet: later text of the same stream joins it."""

    __slots__ = ("stream", "seq", "parts", "tokens")

    def __init__(self, stream: "ReplyStream", seq: int, text: str, tokens: int):
        self.stream, self.seq, self.parts, self.tokens = stream, seq, [text], tokens

    def chunk(self) -> DeltaChunk:
        s = self.stream
        return DeltaChunk(s.request_id, self.seq, s.worker_id, s.attempt, "".join(self.parts), self.tokens)


class Outbox:
    """Chunks waiting to leave, by reply inbox, and the task that sends them (see the module doc)."""

    def __init__(self, nc: NATS, stream_interval: float = 0.0):
        if stream_interval < 0:
            raise ValueError("stream_interval must not be negative")
        self._nc = nc
        self.stream_interval = stream_interval
        self._pending: dict[str, list[Chunk | _OpenDelta]] = {}
        self._urgent = False
        self._wake = asyncio.Event()
        self._nudge: asyncio.Future | None = None  # resolved by an urgent chunk while deltas wait
        self._last_send = 0.0
        self.sends = 0  # batches sent so far: a pending delta of an earlier round is gone
        self._task: asyncio.Task | None = None

    def put(self, inbox: str, item: Chunk | _OpenDelta, urgent: bool) -> None:
        self._pending.setdefault(inbox, []).append(item)
        if urgent:
            self._urgent = True
            if self._nudge is not None and not self._nudge.done():
                self._nudge.set_result(None)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(0)  # the turn's other streams first: one message for all of them
            hold = self._last_send + self.stream_interval - loop.time() if not self._urgent else 0.0
            if hold > 0:
                self._nudge = loop.create_future()
                timer = loop.call_later(hold, _resolve, self._nudge)
                try:
                    await self._nudge
                finally:
                    timer.cancel()
                    self._nudge = None
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything pending now, an inbox at a time (what is put meanwhile goes too)."""
        self._urgent = False
        self.sends += 1  # deltas put from now on start new chunks
        self._last_send = asyncio.get_running_loop().time()
        while self._pending:
            inbox = next(iter(self._pending))
            items = self._pending.pop(inbox)
            await self._send(inbox, [item.chunk() if isinstance(item, _OpenDelta) else item for item in items])

    async def _send(self, inbox: str, chunks: list[Chunk]) -> None:
        try:
            data = encode_chunks(chunks)
            if len(data) > self._nc.max_payload and len(chunks) > 1:
                half = len(chunks) // 2
                await self._send(inbox, chunks[:half])
                await self._send(inbox, chunks[half:])
                return
            await self._nc.publish(inbox, data)
        except Exception as err:  # the gateway sees the gap (or the silence) and fails those streams
            log.warning("lost %d chunks for %s: %s", len(chunks), inbox, err)

    async def close(self) -> None:
        """Send what is pending and stop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending and not self._nc.is_closed:
            await self.flush()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class ReplyStream:
    """One delivery attempt of one request, as its worker answers it: chunks numbered from 0,
    handed to the outbox without waiting."""

    def __init__(self, outbox: Outbox, inbox: str, request_id: str, worker_id: str, attempt: int = 1):
        self._outbox = outbox
        self.inbox, self.request_id, self.worker_id, self.attempt = inbox, request_id, worker_id, attempt
        self.seq = 0
        self.last_sent = time.monotonic()
        self._open: _OpenDelta | None = None
        self._open_round = -1  # the outbox's send count when `_open` was put
        self._spoke = False  # a delta was put: later ones may wait for the stream interval

    def _next_seq(self) -> int:
        seq, self.seq = self.seq, self.seq + 1
        self.last_sent = time.monotonic()
        return seq

    def delta(self, text: str, tokens: int) -> None:
        outbox = self._outbox
        if self._open is not None and self._open_round == outbox.sends:
            self._open.parts.append(text)
            self._open.tokens += tokens
            self.last_sent = time.monotonic()
            return
        self._open = _OpenDelta(self, self._next_seq(), text, tokens)
        self._open_round = outbox.sends
        outbox.put(self.inbox, self._open, urgent=not self._spoke)  # the first text never waits
        self._spoke = True

    def _put(self, chunk: Chunk) -> None:
        self._open = None  # what follows must not join a delta sent before it
        self._outbox.put(self.inbox, chunk, urgent=True)

    def heartbeat(self, started: bool, ack_subject: str | None) -> None:
        self._put(HeartbeatChunk(self.request_id, self._next_seq(), self.worker_id, self.attempt, started,
                                 ack_subject))

    def final(self, finish_reason: str, usage: Usage) -> None:
        self._put(FinalChunk(self.request_id, self._next_seq(), self.worker_id, self.attempt, finish_reason, usage))

    def error(self, code: str, message: str, param: str | None = None) -> None:
        self._put(ErrorChunk(self.request_id, self._next_seq(), self.worker_id, self.attempt, code, message, param))
