"""A choice's life on the bus: check the model is served, open a mailbox, publish the request,
relay its chunks while watching heartbeats and sequence numbers, and publish a cancel if the
client leaves before the end."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import AsyncIterator

from ..proto import subjects
from ..proto.bus import Bus, PayloadTooLarge, QueueFull
from ..proto.messages import (
    CancelMessage,
    DeltaChunk,
    ErrorChunk,
    FinalChunk,
    GenerationRequest,
    HeartbeatChunk,
    encode,
)
from .errors import APIError
from .registry import Registry
from .relay import Mailboxes

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
        if self.registry.recently_served(model) or await self.bus.model_was_served(model):
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

    async def choice_stream(
        self, model: str, sampling, *, messages=None, prompt=None, traceparent: str
    ) -> AsyncIterator[DeltaChunk | FinalChunk]:
        """Yield one choice's deltas and its final chunk; raise APIError for anything else."""
        request_id = new_request_id()
        reply_to, box = self.mailboxes.open(request_id)
        started_at = time.monotonic()
        request = GenerationRequest(
            request_id=request_id,
            model=model,
            messages=messages,
            prompt=prompt,
            sampling=sampling,
            reply_to=reply_to,
            deadline=time.time() + self.request_timeout,
            traceparent=traceparent,
        )
        finished = False
        try:
            await self._publish(request)
            async for chunk in self._relay(box, started_at):
                if isinstance(chunk, FinalChunk):
                    finished = True
                yield chunk
        finally:
            self.mailboxes.close(request_id)
            if not finished:
                await self.bus.nc.publish(
                    subjects.cancel_subject(request_id), encode(CancelMessage(request_id=request_id))
                )

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

    async def _relay(self, box: asyncio.Queue, started_at: float):
        """Chunks of one request in order. Before the first token only the deadline counts (a
        dead worker's request is redelivered); after it, heartbeat silence fails the request."""
        worker: str | None = None  # the worker that produced the first token
        expected: dict[tuple[str, int], int] = {}  # next seq per (worker, delivery attempt)
        deadline = started_at + self.request_timeout
        while True:
            wait = deadline - time.monotonic()
            if worker is not None:
                wait = min(wait, self.heartbeat_timeout)
            try:
                chunk = await asyncio.wait_for(box.get(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:
                if worker is not None and time.monotonic() < deadline:
                    raise APIError(
                        504,
                        f"The worker serving this request stopped responding "
                        f"(no heartbeat for {self.heartbeat_timeout:.0f}s).",
                        code="worker_timeout",
                    ) from None
                raise APIError(
                    504,
                    f"The request did not complete within {self.request_timeout:.0f}s.",
                    code="timeout",
                ) from None
            if worker is not None and chunk.worker_id != worker:
                continue  # a late duplicate from a worker that lost the request
            source = (chunk.worker_id, chunk.attempt)
            if chunk.seq != expected.get(source, 0):
                raise APIError(
                    502,
                    f"Lost part of the token stream (expected chunk {expected.get(source, 0)}, got {chunk.seq}).",
                    code="stream_gap",
                )
            expected[source] = chunk.seq + 1
            if isinstance(chunk, HeartbeatChunk):
                if chunk.started and worker is None:
                    worker = chunk.worker_id
                continue
            if isinstance(chunk, ErrorChunk):
                if chunk.code == "worker_shutdown" and worker is None:
                    continue  # handed back before its first token: another worker takes it
                raise APIError(WORKER_ERRORS[chunk.code], chunk.message, param=chunk.param, code=chunk.code)
            worker = chunk.worker_id
            yield chunk
            if isinstance(chunk, FinalChunk):
                return


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
