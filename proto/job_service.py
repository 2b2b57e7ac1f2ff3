"""A job service on the fabric, written once: the judge and the trainer are each a `JobService`
that supplies its job kind and `run(job)`, and this template does the rest on the job runner:
the cancel check, results for a finish, a cancel, a failure or a drop (one id scheme:
`<submission>-<outcome>`, so a retried result is stored once), progress events, and `serve()`.
Their commands submit and follow a job with `submit_and_follow`, under one rule: Ctrl-C stops
following and the job goes on; the `cancel` command cancels it."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, ClassVar, Generic

from . import tracing
from .bus import Bus
from .events import ArtifactRef, Event, JobCancel, JobKind, JobProgress, JobResult, Scalar
from .job_runner import JobRunner
from .jobs import B, Interrupt, Job, JobSpec, Refuse, RunnerConfig, until_stopped
from .subjects import job_cancel_subject, job_events

log = logging.getLogger(__name__)
_tracer = tracing.tracer("chatfabric.jobs")


class JobService(Generic[B]):
    """One kind of job, served: subclasses set `kind`, `spec` and `span` and write `run`."""

    kind: ClassVar[JobKind]  # "judge" | "train": the events' kind and the consumer's name
    spec: ClassVar[JobSpec]
    span: ClassVar[str]  # the trace span of one job

    def __init__(self, bus: Bus, capacity: int, shutdown_grace: float):
        self.bus, self.capacity, self.shutdown_grace = bus, capacity, shutdown_grace

    # -- what a kind supplies --------------------------------------------------------------------

    async def run(self, job: Job[B]) -> None:
        raise NotImplementedError

    def name(self, body: B) -> str:
        """The job's name: what its events (`job_id`) and its cancels name."""
        return body.id

    def submission(self, body: B) -> str:
        """One submission of the job (its message id): the stem of its results' ids."""
        return body.id

    def submitted_at(self, body: B) -> float:
        """When the job was submitted: a cancel stops the jobs submitted before it."""
        return body.at

    def attributes(self, job: Job[B]) -> dict:
        """More attributes of the job's span."""
        return {}

    def failure(self, job: Job[B]) -> str:
        """What a failed job's result says."""
        return f"{type(job.error).__name__}: {job.error}"

    async def finished(self, body: B) -> bool:
        """True when the job was done before (its result is published again instead)."""
        return False

    # -- the template ----------------------------------------------------------------------------

    async def handle(self, job: Job[B]) -> None:
        body = job.body
        attributes = {"chatfabric.job": self.name(body), "chatfabric.delivery": job.delivery, **self.attributes(job)}
        with _tracer.start_as_current_span(self.span, attributes=attributes):
            if await self.finished(body):
                return
            cancel = await self.bus.last_event(JobCancel, job_cancel_subject(self.name(body)))
            if cancel is not None and self.cancels(job, cancel):
                await self.cancelled(body, cancel.reason)
                raise Refuse(f"cancelled: {cancel.reason}")
            try:
                await self.run(job)
            except asyncio.CancelledError:
                if job.interrupt is Interrupt.CANCEL:
                    await asyncio.shield(self.cancelled(body, job.cancel_reason or "cancelled while running"))
                raise

    def cancels(self, job: Job[B], cancel: JobCancel) -> bool:
        """Whether `cancel` stops `job`: it names the job, and came after the job was submitted."""
        return (cancel.kind == self.kind and cancel.job_id == self.name(job.body)
                and self.submitted_at(job.body) <= cancel.at)

    async def result(self, body: B, outcome: str, *, ok: bool, error: str | None = None,
                     artifacts: tuple[ArtifactRef, ...] = (), summary: dict[str, Scalar] | None = None) -> None:
        await self.bus.publish_event(JobResult(
            id=f"{self.submission(body)}-{outcome}", job_id=self.name(body), kind=self.kind, ok=ok,
            error=error[:4000] if error else None, artifacts=artifacts, summary=summary or {}))

    async def cancelled(self, body: B, reason: str) -> None:
        await self.result(body, "cancelled", ok=False, error=f"cancelled: {reason}")

    async def progress(self, body: B, done: int, total: int | None, message: str = "",
                       metrics: dict[str, Scalar] | None = None) -> None:
        await self.bus.publish_event(JobProgress(job_id=self.name(body), kind=self.kind, done=done, total=total,
                                                 message=message, metrics=metrics or {}))

    async def on_failed(self, job: Job[B]) -> None:
        await self.result(job.body, "failed", ok=False, error=self.failure(job))

    async def on_dropped(self, job: Job[B]) -> None:
        await self.cancelled(job.body, job.cancel_reason or f"job {job.state.value} before it ran")

    async def serve(self, stop: asyncio.Event) -> None:
        """Take this kind's jobs until `stop`, cancelling those a `JobCancel` names; then drain."""
        runner = JobRunner(await self.bus.job_subscription(self.kind), self.spec, self.handle,
                           RunnerConfig(capacity=self.capacity, shutdown_grace=self.shutdown_grace),
                           on_failed=self.on_failed, on_dropped=self.on_dropped)
        async with self.bus.follow_job_events(JobCancel.SUBJECTS) as cancels:
            log.info("%s service taking jobs (capacity %d)", self.kind, self.capacity)
            await runner.serve(stop, cancels, self.cancels)


async def submit_and_follow(bus: Bus, job: Event, name: str, stop: asyncio.Event,
                            on_progress: Callable[[JobProgress], None] = lambda event: None,
                            on_cancel: Callable[[JobCancel], None] = lambda event: None) -> JobResult | None:
    """Publish `job` (whose events name it `name`) and follow its events to its result. `stop`
    (Ctrl-C) ends the following, not the job: None then, and the caller says how to cancel."""
    async with bus.follow_job_events(job_events(name), since=job.at - 1) as events:
        await bus.publish_event(job)

        async def follow() -> JobResult:
            while True:
                event = await events.get()
                if isinstance(event, JobResult) and event.at >= job.at - 1:
                    return event
                if isinstance(event, JobProgress):
                    on_progress(event)
                elif isinstance(event, JobCancel):
                    on_cancel(event)

        following = asyncio.ensure_future(follow())
        return following.result() if await until_stopped(following, stop) else None
