"""The worker: generation requests served from the model's durable consumer.

Pulling, keep-alive, ack/nak/term, deadlines, cancels and drain are the job runner's
(`proto.jobs`): it pulls only as many requests as there are free slots, and a request stays
un-acked (kept alive with `in_progress`) until its first token, so a worker that dies before
then leaves it to another worker. What is left here is a request's life, `_serve`: render,
resolve, generate, stream, final. A cancel (`ctl.cancel.<request_id>`) cancels the request's
task, which closes the backend's generator within one step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from ..proto.bus import Bus
from ..proto.job_runner import JobRunner
from ..proto.jobs import HandBack, Interrupt, Job, JobSpec, JobState, Refuse, RunnerConfig
from ..proto.messages import CancelMessage, GenerationRequest, MessageError, Usage
from ..proto.outbox import ReplyStream
from .backend import Backend, KVCacheFull, TooLargeForCache
from .params import check_for_model, resolve_sampling
from .metrics import RequestTrace, watch
from .config import WorkerConfig
from .presence import Presence
from .prompting import PromptBuilder, PromptError
from .textstream import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

INLINE_RENDER_CHARS = 4096  # prompts up to this size are tokenized on the loop, longer ones off it
KV_RETRY_DELAY = 0.5  # seconds before JetStream offers a request that did not fit the KV cache again

GENERATION = JobSpec(
    "generation", GenerationRequest, job_id=lambda r: r.request_id, deadline=lambda r: r.deadline
)


class Worker:
    def __init__(self, bus: Bus, backend: Backend, prompts: PromptBuilder, config: WorkerConfig):
        self.bus = bus
        self.backend = backend
        self.prompts = prompts
        self.config = config
        self.presence = Presence(bus, config, backend, lambda: self.in_flight)
        self.outbox = bus.open_outbox(config.stream_interval)
        self._runner: JobRunner[GenerationRequest] | None = None

    @property
    def in_flight(self) -> int:
        return self._runner.active if self._runner is not None else 0

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down gracefully: withdraw the card, hand back the
        requests that have not started, let started ones finish for the shutdown grace."""
        pull = await self.bus.ensure_consumer(self.config.model_name)
        self._runner = runner = JobRunner(
            pull, GENERATION, self._serve,
            RunnerConfig(
                capacity=self.config.max_concurrency,
                keep_alive=self.config.heartbeat_interval / 2,  # at the token plane's heartbeat ticks
                shutdown_grace=self.config.shutdown_grace,
            ),
            on_invalid=self._reject_malformed,
            on_dropped=self._answer_dropped,
            on_active_change=self.presence.changed,
        )
        cancels = await self.bus.subscribe_cancels(self._on_cancel)
        watch(self.config.model_name, runner.jobs, self.backend)
        log.info("worker %s serving %r", self.config.worker_id, self.config.model_name)
        async with self.presence, runner:  # leaving: the runner drains, then the beats stop
            try:
                await runner.pull(stop)
            finally:
                await pull.unsubscribe()
                await cancels.unsubscribe()
                await self.presence.withdraw()

    # -- one request's life ----------------------------------------------------------------

    async def _serve(self, job: Job[GenerationRequest]) -> None:
        request = job.body
        reply = self._reply(request.request_id, request.reply_to, job.delivery)
        heartbeat = asyncio.create_task(self._heartbeat(job, reply))
        observed = RequestTrace(self.config.model_name, request.traceparent, _stored_ns(job), request.request_id)
        outcome, counts = "internal_error", (0, 0)
        try:
            counts = await self._generate(job, request, reply, observed)
            outcome = "ok"
        except KVCacheFull:
            # Fits the budget, not next to what runs now: back to JetStream, for us or a peer,
            # and nothing more pulled until a running request frees cache.
            outcome = "handed_back"
            raise HandBack(KV_RETRY_DELAY, hold_pulls=True) from None
        except (PromptError, TooLargeForCache) as err:
            outcome = "context_length_exceeded" if isinstance(err, ContextTooLong) else "invalid_request"
            reply.error(
                outcome,
                str(err),
                param=getattr(err, "param", None) or ("messages" if request.messages is not None else "prompt"),
            )
            raise Refuse(str(err)) from None
        except asyncio.CancelledError:
            outcome = "cancelled" if job.interrupt is Interrupt.CANCEL else "stopped"
            self._say_stopped(job, reply)
            raise
        except Exception as err:
            reply.error("internal_error", f"{type(err).__name__}: {err}")
            raise
        finally:
            heartbeat.cancel()
            observed.end(outcome, *counts)

    def _reply(self, request_id: str, reply_to: str, attempt: int = 1) -> ReplyStream:
        return ReplyStream(self.outbox, reply_to, request_id, self.config.worker_id, attempt)

    async def _generate(self, job: Job, request: GenerationRequest, reply: ReplyStream,
                        observed: RequestTrace) -> tuple[int, int]:
        """Stream the request's answer; (prompt tokens, generated tokens)."""
        if _input_chars(request) <= INLINE_RENDER_CHARS:
            prompt_ids = self._render(request)  # tens of microseconds: cheaper than a thread hop
        else:
            prompt_ids = await asyncio.to_thread(self._render, request)
        room = self.backend.context_length - len(prompt_ids)
        check_for_model(request.sampling, vocab=len(self.backend.tokenizer), room=room)
        sampling = resolve_sampling(
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
        started = job.started
        try:
            async for event in events:
                if not started:
                    await job.start()  # the first token: the request is ours for good
                    started = True
                observed.token()
                generated += 1
                pending += 1
                text = stops.feed(detok.push(event.token_id))
                if stops.stopped:
                    finish = "stop"
                if text or stops.stopped:
                    reply.delta(text, pending)
                    pending = 0
                if stops.stopped:
                    break
                if event.finish_reason is not None:
                    finish = event.finish_reason
        finally:
            await events.aclose()
        tail = "" if stops.stopped else stops.feed(detok.flush()) + stops.flush()
        if tail or pending:
            reply.delta(tail, pending)
        usage = Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=generated,
            total_tokens=len(prompt_ids) + generated,
        )
        reply.final(finish, usage)
        return len(prompt_ids), generated

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

    def _say_stopped(self, job: Job, reply: ReplyStream) -> None:
        if job.interrupt is Interrupt.CANCEL:
            code, message = "cancelled", "cancelled"
        elif job.started:
            code, message = "worker_shutdown", "the worker stopped this request"
        else:
            return  # handed back before its first token: another worker serves it
        reply.error(code, message)

    async def _heartbeat(self, job: Job, reply: ReplyStream) -> None:
        """Heartbeat the reply inbox: before the first token at every tick, carrying the
        delivery's ack subject so that a gateway can hand the request back soon after this
        process dies; after it, whenever nothing else was sent for a heartbeat interval."""
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval / 2)
            if job.started and time.monotonic() - reply.last_sent < interval:
                continue
            reply.heartbeat(job.started, None if job.started else job.ack_subject)

    # -- requests that never reach `_serve` ------------------------------------------------

    async def _reject_malformed(self, data: bytes, error: MessageError) -> None:
        """Answer a request that failed validation on its reply inbox, if it names one."""
        try:
            raw = json.loads(data)
            reply_to, request_id = raw["reply_to"], str(raw.get("request_id") or "unknown")
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if isinstance(reply_to, str) and reply_to:
            self._reply(request_id, reply_to).error("invalid_request", str(error))

    async def _answer_dropped(self, job: Job[GenerationRequest]) -> None:
        """A request past its deadline is told so; a cancelled one has nobody left to tell."""
        if job.state is JobState.EXPIRED:
            self._reply(job.id, job.body.reply_to, job.delivery).error(
                "deadline_exceeded", "the request expired before a worker took it")

    async def _on_cancel(self, cancel: CancelMessage) -> None:
        self._runner.cancel(cancel.request_id, cancel.reason)


def _input_chars(request: GenerationRequest) -> int:
    if request.messages is not None:
        return sum(len(m.content) for m in request.messages)
    return len(request.prompt)


class ContextTooLong(PromptError):
    """The prompt leaves no room for a completion."""


def _stored_ns(job: Job) -> int | None:
    """When JetStream stored the request (its queue wait starts there), in unix nanoseconds."""
    stored = job.stored_at
    return int(stored * 1e9) if stored is not None else None
