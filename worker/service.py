"""The worker process: pull, admit, generate, stream, ack.

A worker pulls from its model's durable consumer only as many requests as it has free slots.
Each request's life is `_serve`: it stays un-acked (with `in_progress` sent while it prefills)
until its first token, so a worker that dies before then leaves it to another worker; it is
acked on the first token. Cancellation arrives on `ctl.cancel.<request_id>` and cancels the
request's task, which closes the backend's generator within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from ..proto.bus import Bus
from ..proto.messages import (
    AliveMessage,
    CancelMessage,
    DeltaChunk,
    ErrorChunk,
    FinalChunk,
    GenerationRequest,
    HeartbeatChunk,
    MessageError,
    ModelCard,
    SamplingParams,
    Usage,
    WorkerCard,
    decode,
    encode,
)
from .backend import Backend
from .engine import KVCacheFull, TooLargeForCache
from .prompting import PromptBuilder, PromptError
from .sampling import resolve
from .textstream import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

CANCELLED_MEMORY = 600.0  # seconds a cancel for a not-yet-pulled request is remembered
INLINE_RENDER_CHARS = 4096  # prompts up to this size are tokenized on the loop, longer ones off it


def version() -> str:
    try:
        return importlib.metadata.version("chatfabric")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def new_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    model_name: str
    max_concurrency: int = 16
    heartbeat_interval: float = 1.0  # token-plane heartbeats and in_progress while prefilling
    shutdown_grace: float = 30.0  # seconds started requests get to finish on shutdown
    worker_id: str = field(default_factory=new_worker_id)

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model name must not be empty")
        if self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.heartbeat_interval <= 0 or self.shutdown_grace < 0:
            raise ValueError("heartbeat interval must be positive and shutdown grace not negative")


class _Reply:
    """Publishes one request's chunks, numbered, to its reply inbox."""

    def __init__(self, bus: Bus, request_id: str, reply_to: str, worker_id: str, attempt: int = 1):
        self._bus = bus
        self.request_id = request_id
        self.reply_to = reply_to
        self.worker_id = worker_id
        self.attempt = attempt
        self.seq = 0
        self.last_sent = time.monotonic()
        self.started = False

    async def send(self, chunk_type, **fields) -> None:
        chunk = chunk_type(
            request_id=self.request_id, seq=self.seq, worker_id=self.worker_id, attempt=self.attempt, **fields
        )
        self.seq += 1
        self.last_sent = time.monotonic()
        await self._bus.publish_chunk(self.reply_to, chunk)

    async def error(self, code: str, message: str, param: str | None = None) -> None:
        await self.send(ErrorChunk, code=code, message=message, param=param)


@dataclass
class _Running:
    task: asyncio.Task
    reply: _Reply


class Worker:
    def __init__(self, bus: Bus, backend: Backend, prompts: PromptBuilder, config: WorkerConfig):
        self.bus = bus
        self.backend = backend
        self.prompts = prompts
        self.config = config
        self.started_at = time.time()
        self._running: dict[str, _Running] = {}  # by request id
        self._cancelled: dict[str, float] = {}
        self._slot_freed = asyncio.Event()
        self._card_changed = asyncio.Event()
        self._draining = False
        # After a request did not fit the KV cache: the free tokens then. Pulling resumes once
        # more than that is free (a running request finished).
        self._kv_blocked_at: int | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def card(self) -> WorkerCard:
        return WorkerCard(
            worker_id=self.config.worker_id,
            models=(ModelCard(name=self.config.model_name, context_length=self.backend.context_length),),
            backend=self.backend.kind,
            device=self.backend.device,
            capacity=self.config.max_concurrency,
            in_flight=self.in_flight,
            version=version(),
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            ttl=self.bus.config.registry_ttl,
            heartbeat_interval=self.config.heartbeat_interval,
            # backends that manage their own cache (vLLM) have no budget to report
            kv_cache_tokens=getattr(self.backend, "kv_cache_tokens", None),
            kv_free_tokens=self.backend.kv_free_tokens if hasattr(self.backend, "kv_cache_tokens") else None,
        )

    # -- the pull loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down gracefully."""
        psub = await self.bus.ensure_consumer(self.config.model_name)
        cancel_sub = await self.bus.subscribe_cancels(self._on_cancel)
        await self.bus.put_card(self.card())
        self.bus.on_reconnect(self._announce)
        card_task = asyncio.create_task(self._refresh_card(stop), name="card")
        beat_task = asyncio.create_task(self._beat(), name="alive")
        log.info("worker %s serving %r", self.config.worker_id, self.config.model_name)
        try:
            while not stop.is_set():
                free = self.config.max_concurrency - self.in_flight
                if free <= 0 or self._kv_blocked():
                    self._slot_freed.clear()
                    await _wait_any(self._slot_freed, stop)
                    continue
                try:
                    msgs = await psub.fetch(free, timeout=1.0)
                except (asyncio.TimeoutError, NatsTimeout):
                    continue
                for msg in msgs:
                    await self._admit(msg)
        finally:
            for sub in (psub, cancel_sub):
                with contextlib.suppress(Exception):  # a closed connection has nothing to undo
                    await sub.unsubscribe()
            await self._shutdown()
            card_task.cancel()
            beat_task.cancel()
            with contextlib.suppress(Exception):
                await self.bus.delete_card(self.config.worker_id)

    async def _admit(self, msg: Msg) -> None:
        if self._draining or self.in_flight >= self.config.max_concurrency:
            await msg.nak()  # more than we asked for: let another worker (or us, later) take it
            return
        try:
            request = decode(GenerationRequest, msg.data)
        except MessageError as err:
            await self._reject_malformed(msg, str(err))
            return
        if request.request_id in self._running:  # a redelivery of what we already serve
            return
        reply = _Reply(
            self.bus, request.request_id, request.reply_to, self.config.worker_id, msg.metadata.num_delivered
        )
        task = asyncio.create_task(self._serve(msg, request, reply), name=request.request_id)
        self._running[request.request_id] = _Running(task, reply)
        self._card_changed.set()

    def _kv_blocked(self) -> bool:
        if self._kv_blocked_at is not None and self.backend.kv_free_tokens > self._kv_blocked_at:
            self._kv_blocked_at = None
        return self._kv_blocked_at is not None

    async def _reject_malformed(self, msg: Msg, reason: str) -> None:
        """Answer a request that failed validation on its reply inbox, if it names one."""
        log.warning("rejected malformed request: %s", reason)
        await msg.term()
        try:
            raw = json.loads(msg.data)
            reply_to, request_id = raw["reply_to"], str(raw.get("request_id") or "unknown")
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(reply_to, str) and reply_to:
            await _Reply(self.bus, request_id, reply_to, self.config.worker_id).error(
                "invalid_request", reason
            )

    # -- one request's life ----------------------------------------------------------------

    async def _serve(self, msg: Msg, request: GenerationRequest, reply: _Reply) -> None:
        keep_alive = asyncio.create_task(self._keep_alive(msg, reply))
        try:
            if request.expired():
                await msg.term()
                await reply.error("deadline_exceeded", "the request expired before a worker took it")
                return
            if request.request_id in self._cancelled:
                await msg.term()
                return
            await self._generate(msg, request, reply)
        except KVCacheFull:
            # Fits the budget, not next to what runs now: back to JetStream, for us or a peer.
            self._kv_blocked_at = self.backend.kv_free_tokens
            await msg.nak(delay=0.5)
        except (PromptError, TooLargeForCache) as err:
            await msg.term()
            await reply.error(
                "context_length_exceeded" if isinstance(err, ContextTooLong) else "invalid_request",
                str(err),
                param=getattr(err, "param", None) or ("messages" if request.messages is not None else "prompt"),
            )
        except asyncio.CancelledError:
            await self._on_cancelled(msg, reply)
        except Exception as err:
            log.exception("request %s failed", request.request_id)
            if not reply.started:
                await msg.term()
            await reply.error("internal_error", f"{type(err).__name__}: {err}")
        finally:
            keep_alive.cancel()
            self._running.pop(request.request_id, None)
            self._slot_freed.set()
            self._card_changed.set()

    async def _generate(self, msg: Msg, request: GenerationRequest, reply: _Reply) -> None:
        if _input_chars(request) <= INLINE_RENDER_CHARS:
            prompt_ids = self._render(request)  # tens of microseconds: cheaper than a thread hop
        else:
            prompt_ids = await asyncio.to_thread(self._render, request)
        room = self.backend.context_length - len(prompt_ids)
        check_for_model(request.sampling, vocab=len(self.backend.tokenizer), room=room)
        sampling = resolve(
            request.sampling,
            room=room,
            eos_token_ids=self.backend.eos_token_ids,
            defaults=self.backend.generation_defaults,
        )
        detok = IncrementalDetokenizer(self.backend.tokenizer, prompt_ids[-6:])
        stops = StopMatcher(request.sampling.stop)
        generated = pending = 0
        finish = "length"
        events = self.backend.generate(prompt_ids, sampling)
        try:
            async for event in events:
                if not reply.started:
                    reply.started = True
                    await msg.ack()
                generated += 1
                pending += 1
                text = stops.feed(detok.push(event.token_id))
                if stops.stopped:
                    finish = "stop"
                if text or stops.stopped:
                    await reply.send(DeltaChunk, text=text, token_count=pending)
                    pending = 0
                if stops.stopped:
                    break
                if event.finish_reason is not None:
                    finish = event.finish_reason
        finally:
            await events.aclose()
        tail = "" if stops.stopped else stops.feed(detok.flush()) + stops.flush()
        if tail or pending:
            await reply.send(DeltaChunk, text=tail, token_count=pending)
        usage = Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=generated,
            total_tokens=len(prompt_ids) + generated,
        )
        await reply.send(FinalChunk, finish_reason=finish, usage=usage)

    def _render(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            ids = self.prompts.chat_ids(request.messages)
            what = "messages"
        else:
            ids = self.prompts.completion_ids(request.prompt)
            what = "prompt"
        limit = self.backend.context_length
        if len(ids) >= limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, your {what} "
                f"resulted in {len(ids)} tokens, which leaves no room for a completion. "
                f"Please reduce the length of the {what}."
            )
        return ids

    async def _on_cancelled(self, msg: Msg, reply: _Reply) -> None:
        if self._draining and not reply.started:
            await msg.nak()  # shutting down before the first token: another worker serves it
            return
        if not reply.started:
            await msg.term()
        code = "worker_shutdown" if self._draining else "cancelled"
        with contextlib.suppress(Exception):
            await reply.error(code, "the worker stopped this request" if self._draining else "cancelled")

    async def _keep_alive(self, msg: Msg, reply: _Reply) -> None:
        """While a request waits for its first token, keep JetStream from redelivering it; at any
        time, heartbeat the reply inbox when nothing else was sent for a while. A failed send
        (the connection is down) is retried at the next tick, never ends the keep-alive."""
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval / 2)
            try:
                if not reply.started:
                    await msg.in_progress()
                # Before the first token every tick carries the delivery's ack subject, so that
                # a gateway can hand the request back soon after this process dies.
                if not reply.started or time.monotonic() - reply.last_sent >= interval:
                    ack_subject = None if reply.started else msg.reply
                    await reply.send(HeartbeatChunk, started=reply.started, ack_subject=ack_subject)
            except Exception as err:
                log.debug("keep-alive of %s failed: %s", reply.request_id, err)

    async def _beat(self) -> None:
        """Tell gateways this process is alive, every heartbeat interval, until it exits: a
        gateway fails a started request within seconds when these stop (a killed worker)."""
        while True:
            try:
                await self.bus.publish_alive(AliveMessage(worker_id=self.config.worker_id, in_flight=self.in_flight))
            except Exception as err:
                log.debug("liveness beat failed: %s", err)
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _announce(self) -> None:
        """After a reconnect, put the card back at once: it may have expired while NATS was down."""
        self._card_changed.set()

    # -- control plane ---------------------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(CancelMessage, msg.data)
        except MessageError as err:
            log.warning("ignored malformed cancel: %s", err)
            return
        running = self._running.get(cancel.request_id)
        if running is not None:
            log.info("cancelling %s: %s", cancel.request_id, cancel.reason)
            running.task.cancel()
            return
        now = time.monotonic()
        self._cancelled[cancel.request_id] = now
        for request_id, when in list(self._cancelled.items()):
            if now - when > CANCELLED_MEMORY:
                del self._cancelled[request_id]

    async def _refresh_card(self, stop: asyncio.Event) -> None:
        """Keep the registry card fresh: on every change of load, and at least every ttl/3."""
        period = self.bus.config.registry_ttl / 3
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._card_changed.wait(), timeout=period)
            self._card_changed.clear()
            try:
                await self.bus.put_card(self.card())
            except Exception as err:  # a lost connection must not kill the worker
                log.warning("registry refresh failed: %s", err)
            await asyncio.sleep(0.1)

    async def _shutdown(self) -> None:
        """Deregister, hand back requests that have not started, let started ones finish."""
        self._draining = True
        with contextlib.suppress(Exception):
            await self.bus.delete_card(self.config.worker_id)
        for running in list(self._running.values()):
            if not running.reply.started:
                running.task.cancel()
        pending = [running.task for running in self._running.values()]
        if pending:
            log.info("waiting up to %.0fs for %d requests", self.config.shutdown_grace, len(pending))
            _, late = await asyncio.wait(pending, timeout=self.config.shutdown_grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)


def _input_chars(request: GenerationRequest) -> int:
    if request.messages is not None:
        return sum(len(m.content) for m in request.messages)
    return len(request.prompt)


class ContextTooLong(PromptError):
    """The prompt leaves no room for a completion."""


class InvalidParameter(PromptError):
    """A sampling parameter this model cannot honour; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_for_model(params: SamplingParams, *, vocab: int, room: int) -> None:
    """The rules that need the model: token ids within its vocabulary, min_tokens within the
    context left after the prompt."""
    for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise InvalidParameter(f"{name}: token ids out of range [0, {vocab}): {bad[:5]}", name)
    if params.min_tokens > room:
        raise InvalidParameter(
            f"min_tokens ({params.min_tokens}) exceeds the {room} tokens left in the context after the prompt",
            "min_tokens",
        )


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
