"""A choice's life on the bus: check the model is served, open a mailbox, publish the request,
relay its chunks while watching heartbeats and sequence numbers, and publish a cancel if the
client leaves before the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import AsyncIterator

from ..proto import tracing
from ..proto.bus import Bus, BusUnavailable, PayloadTooLarge, QueueFull
from ..proto.messages import (
    CancelMessage,
    DeltaChunk,
    ErrorChunk,
    FinalChunk,
    GenerationRequest,
    HeartbeatChunk,
)
from . import metrics
from .errors import APIError
from .registry import Registry
from .relay import Mailbox, Mailboxes

log = logging.getLogger(__name__)

WORKER_ERRORS = {  # error chunk code -> HTTP status
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "deadline_exceeded": 504,
    "cancelled": 499,
    "worker_shutdown": 503,
    "internal_error": 500,
}


def new_request_id() -> str:
    return uuid.uuid4().hex


def new_traceparent(incoming: str | None) -> str:
    """Keep the client's W3C trace id when it sent one; start a new trace otherwise."""
    if incoming:
        parts = incoming.split("-")
        if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            return f"00-{parts[1]}-{secrets.token_hex(8)}-{parts[3]}"
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"



class Generations:
    """Publishes generation requests and relays their chunks for the handlers."""

    def __init__(self, bus: Bus, registry: Registry, mailboxes: Mailboxes, *,
                 request_timeout: float, heartbeat_timeout: float):
        self.bus = bus
        self.registry = registry
        self.mailboxes = mailboxes
        self.request_timeout = request_timeout
        self.heartbeat_timeout = heartbeat_timeout

    async def check_model(self, model: str) -> None:
        if model in self.registry.models():
            return
        self._check_bus()
        try:
            served = self.registry.recently_served(model) or await self.bus.model_was_served(model)
        except BusUnavailable:
            raise _bus_unavailable() from None
        if served:
            raise APIError(
                503,
                f"No worker is serving model '{model}' right now; retry shortly.",
                code="model_unavailable",
                retry_after=5,
            )
        available = sorted(self.registry.models())
        raise APIError(
            404,
            f"The model '{model}' does not exist. Available models: {', '.join(available) or 'none'}.",
            param="model",
            code="model_not_found",
        )

    def _check_bus(self) -> None:
        if self.bus.closed:
            raise _bus_unavailable()

    async def choice_stream(
        self, model: str, sampling, *, messages=None, prompt=None, traceparent: str
    ) -> AsyncIterator[DeltaChunk | FinalChunk]:
        """Yield one choice's deltas and its final chunk; raise APIError for anything else."""
        request_id = new_request_id()
        box = self.mailboxes.open(request_id)
        started_at = time.monotonic()
        observed = metrics.ChoiceStats(model, request_id)
        if observed.span.is_recording():
            traceparent = tracing.traceparent_of(observed.span)
        request = GenerationRequest(
            request_id=request_id,
            model=model,
            messages=messages,
            prompt=prompt,
            sampling=sampling,
            reply_to=self.mailboxes.inbox,
            deadline=time.time() + self.request_timeout,
            traceparent=traceparent,
        )
        finished = False
        relay = _Relay(self, request_id, box, started_at)
        try:
            self._check_bus()
            await self._publish(request)
            async for chunk in relay.chunks():
                observed.chunk(chunk, relay.first_answer)
                if isinstance(chunk, FinalChunk):
                    finished = True
                yield chunk
        except APIError as err:
            observed.failed(err.code or str(err.status))
            raise
        except asyncio.CancelledError:
            observed.failed("client_gone")
            raise
        finally:
            observed.end(relay.first_answer)
            self.mailboxes.close(request_id)
            if not finished and not self.bus.closed:
                with contextlib.suppress(Exception):  # best effort: the worker also has a deadline
                    await self.bus.publish_cancel(CancelMessage(request_id=request_id))

    async def _publish(self, request: GenerationRequest) -> None:
        try:
            await self.bus.publish_request(request)
        except QueueFull:
            raise APIError(
                429,
                f"The queue for model '{request.model}' is full; retry shortly.",
                type="rate_limit_error",
                code="queue_full",
                retry_after=1,
            ) from None
        except PayloadTooLarge as err:
            raise APIError(
                413,
                f"The request is larger than the message bus accepts ({err.args[0]} bytes).",
                code="request_too_large",
            ) from None
        except BusUnavailable:
            raise _bus_unavailable() from None


def _bus_unavailable() -> APIError:
    return APIError(503, "The message bus is not reachable right now; retry shortly.",
                    code="bus_unavailable", retry_after=2)


class Phase(Enum):
    """Where a relayed request is, as the chunks of its worker show it."""

    UNBOUND = "unbound"  # no worker has answered yet
    BOUND = "bound"  # a worker took it; the ack subject of its delivery is not known yet
    HOLDING = "holding"  # a worker holds it before its first token: watched, handed back if it dies
    HANDED_BACK = "handed_back"  # its worker died before the first token; we naked the delivery
    STARTED = "started"  # the first token came: watched for death and silence until the end


@dataclass
class _Binding:
    """The worker a request is bound to, for one delivery attempt."""

    worker: str
    attempt: int
    next_seq: int = 0  # the chunk expected next
    ack_subject: str | None = None  # its delivery's, until the first token


class _Relay:
    """One request's chunks in order, from the worker that serves it.

    Before the first token only the deadline counts: a request whose worker dies then is
    redelivered by JetStream to another worker. The first chunk binds the request to its worker;
    until the first token a chunk from a later delivery attempt may move it to another worker,
    after it chunks from anyone else are dropped and logged. A started request fails within
    seconds when its worker stops sending liveness beats (it died), and after
    `heartbeat_timeout` of silence on the request itself (the worker lives but lost it)."""

    def __init__(self, generations: Generations, request_id: str, box: Mailbox, started_at: float):
        self.g = generations
        self.request_id = request_id
        self.box = box
        self.deadline = started_at + generations.request_timeout
        self.phase = Phase.UNBOUND
        self.bound: _Binding | None = None
        self.last_chunk = started_at
        self.first_answer: float | None = None  # when a worker first answered (it took the request)
        self.reconnects_at_start = generations.bus.reconnects
        self.dropped = 0

    async def chunks(self):
        """The request's deltas and its final chunk. The deltas that arrived together are
        yielded as one (their text joined): a stream faster than its reader costs one SSE event
        per wake, not one per token."""
        while True:
            text, tokens, last = [], 0, None
            for chunk in await self._next():
                try:
                    accepted = self._accept(chunk)
                except APIError:
                    if last is not None:
                        yield _joined(last, text, tokens)  # the text before the gap, then the error
                    raise
                if not accepted:
                    continue
                if self.first_answer is None:
                    self.first_answer = time.monotonic()
                if isinstance(chunk, HeartbeatChunk):
                    self._beat(chunk)
                    continue
                if isinstance(chunk, ErrorChunk):
                    if chunk.code == "worker_shutdown" and self.phase is not Phase.STARTED:
                        continue  # handed back before its first token: another worker takes it
                    if last is not None:
                        yield _joined(last, text, tokens)
                    raise APIError(WORKER_ERRORS[chunk.code], chunk.message, param=chunk.param, code=chunk.code)
                self.phase = Phase.STARTED
                if isinstance(chunk, DeltaChunk):
                    text.append(chunk.text)
                    tokens += chunk.token_count
                    last = chunk
                    continue
                if last is not None:
                    yield _joined(last, text, tokens)
                yield chunk  # the final one
                return
            if last is not None:
                yield _joined(last, text, tokens)

    def _beat(self, chunk: HeartbeatChunk) -> None:
        if chunk.started:
            self.phase = Phase.STARTED
        if self.phase in (Phase.STARTED, Phase.HANDED_BACK):
            return
        self.bound.ack_subject = chunk.ack_subject
        self.phase = Phase.HOLDING if chunk.ack_subject is not None else Phase.BOUND

    async def _next(self) -> list:
        """The chunks that arrived; between them, at every tick, the deadline and the liveness
        of the worker that holds the request are checked."""
        while True:
            if time.monotonic() >= self.deadline:
                raise APIError(504, f"The request did not complete within {self.g.request_timeout:.0f}s.",
                               code="timeout")
            chunks = await self.box.take()
            if chunks:
                return chunks
            if self.phase is Phase.STARTED:
                self._check_worker_alive()
            elif self.phase is Phase.HOLDING and self._worker_dead():
                await self._hand_back()

    def _worker_dead(self) -> bool:
        registry = self.g.registry
        silent = registry.silence(self.bound.worker)
        return silent is not None and silent > registry.liveness_timeout(self.bound.worker)

    async def _hand_back(self) -> None:
        """The worker died before the first token: nak its delivery so that another worker gets
        the request now (JetStream would otherwise wait for ack_wait)."""
        self.phase = Phase.HANDED_BACK  # once per attempt: a later attempt binds anew
        log.info("request %s: worker %s died before its first token; handing the request back",
                 self.request_id, self.bound.worker)
        with contextlib.suppress(Exception):
            await self.g.bus.hand_back(self.bound.ack_subject)

    def _check_worker_alive(self) -> None:
        silent = self.g.registry.silence(self.bound.worker)
        if self._worker_dead():
            raise APIError(
                504,
                f"The worker serving this request stopped responding (no sign of life for {silent:.1f}s); "
                "it has probably died.",
                code="worker_timeout",
            )
        quiet = time.monotonic() - self.last_chunk
        if quiet > self.g.heartbeat_timeout:
            raise APIError(
                504,
                f"The worker serving this request stopped responding (no heartbeat for {quiet:.0f}s).",
                code="worker_timeout",
            )

    def _accept(self, chunk) -> bool:
        """Bind to the first worker that answers; drop chunks from anyone else. A seq gap fails
        the request rather than returning text with a hole."""
        bound = self.bound
        rebind = bound is not None and self.phase is not Phase.STARTED and chunk.attempt > bound.attempt
        if bound is not None and chunk.worker_id != bound.worker and not rebind:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("request %s: dropped a chunk from %r, which does not serve it (bound to %r)",
                            self.request_id, chunk.worker_id, bound.worker)
            return False
        if bound is None or rebind:
            bound = self.bound = _Binding(chunk.worker_id, chunk.attempt)
            self.phase = Phase.BOUND
        if chunk.attempt != bound.attempt:
            return False  # a late chunk of an earlier attempt by the same worker
        if chunk.seq != bound.next_seq:
            raise self._gap(chunk.seq)
        bound.next_seq += 1
        self.last_chunk = time.monotonic()
        return True

    def _gap(self, got: int) -> APIError:
        lost = f"expected chunk {self.bound.next_seq}, got {got}"
        if self.g.bus.reconnects != self.reconnects_at_start:
            message = (f"Part of the token stream was lost while the connection to the message bus was "
                       f"re-established ({lost}).")
        else:
            message = f"Lost part of the token stream ({lost})."
        return APIError(502, message, code="stream_gap")


def _joined(last: DeltaChunk, text: list[str], tokens: int) -> DeltaChunk:
    if len(text) == 1:
        return last
    return DeltaChunk(last.request_id, last.seq, last.worker_id, last.attempt, "".join(text), tokens)


async def merge_choices(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several choice streams as (index, chunk), failing fast on the first error."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, done))
        except BaseException as err:  # handed to the consumer, which re-raises it
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
