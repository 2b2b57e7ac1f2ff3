"""The job runner (`JobRunner`): pulls jobs from one durable consumer, only as many as there is
room for, runs each in its own task and settles every delivery exactly once, as the life of a
job in `proto/jobs.py` says."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Generic, TypeVar

from .events import JobCancel
from .jobs import B, HandBack, Interrupt, Job, JobSpec, JobState, RunnerConfig, Settle, ending
from .messages import MessageError
from .pull import Delivery, Pull

log = logging.getLogger("chatfabric.proto.jobs")


Handler = Callable[[Job[B]], Awaitable[None]]


class JobRunner(Generic[B]):
    """Runs jobs from one pull subscription, at most `config.capacity` at once (see the module
    docstring for their life). Hooks, all optional and awaited:

    - `on_invalid(data, error)`: a message that did not validate was terminated; answer it if
      it names somewhere to answer;
    - `on_dropped(job)`: a job was terminated unrun, EXPIRED or CANCELLED before it was pulled;
    - `on_failed(job)`: a job FAILED (`job.error` says why);
    - `on_active_change()` (plain call): the number of running jobs changed.
    """

    def __init__(
        self,
        jobs: Pull,
        kind: JobSpec[B],
        handler: Handler,
        config: RunnerConfig,
        *,
        on_invalid: Callable[[bytes, MessageError], Awaitable[None]] | None = None,
        on_dropped: Callable[[Job[B]], Awaitable[None]] | None = None,
        on_failed: Callable[[Job[B]], Awaitable[None]] | None = None,
        on_active_change: Callable[[], None] | None = None,
    ):
        self.kind = kind
        self.config = config
        self._pull = jobs
        self._handler = handler
        self._on_invalid = on_invalid
        self._on_dropped = on_dropped
        self._on_failed = on_failed
        self._on_active_change = on_active_change or (lambda: None)
        self._jobs: dict[str, Job[B]] = {}  # running, by job id
        self._cancelled: _Recent[str] = _Recent(config.cancel_memory)  # jobs cancelled before they were pulled: reasons
        self._heard: _Recent[JobCancel] = _Recent(config.cancel_memory)  # the cancels `serve` heard
        self._cancels_job: Callable[[Job[B], JobCancel], bool] = lambda job, cancel: False
        self._held = False  # a job was handed back with hold_pulls and others still run
        self._draining = False
        self._keep_alive: asyncio.Task | None = None
        self._settling: set[asyncio.Task] = set()  # terms sent at a cancel, held until sent

    @property
    def active(self) -> int:
        return len(self._jobs)

    @property
    def room(self) -> int:
        """How many more jobs the runner may take now."""
        if self._held or self._draining:
            return 0
        return max(0, self.config.capacity - self.active)

    def jobs(self) -> list[Job[B]]:
        return list(self._jobs.values())

    async def serve(self, stop: asyncio.Event, cancels: asyncio.Queue,
                    cancels_job: Callable[[Job[B], JobCancel], bool]) -> None:
        """Take jobs until `stop`, then drain. Meanwhile cancel the running jobs that a request
        from `cancels` (a `JobCancel` queue, see `Bus.follow_job_events`) names:
        `cancels_job(job, cancel)`, and drop the jobs it names that are pulled later."""
        self._cancels_job = cancels_job
        watcher = asyncio.create_task(self._cancel_when_asked(cancels), name=f"{self.kind.name}-cancels")
        try:
            async with self:
                await self.pull(stop)
        finally:
            watcher.cancel()

    async def _cancel_when_asked(self, cancels: asyncio.Queue) -> None:
        while True:
            cancel = await cancels.get()
            if not isinstance(cancel, JobCancel):
                continue
            self._heard.add(cancel.id, cancel)
            for job in self.jobs():
                if self._cancels_job(job, cancel):
                    self.cancel(job.id, cancel.reason)

    def _cancel_heard(self, job: Job[B]) -> JobCancel | None:
        return next((cancel for cancel in self._heard.values() if self._cancels_job(job, cancel)), None)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "JobRunner[B]":
        self._keep_alive = asyncio.create_task(self._keep_waiting_alive(), name=f"{self.kind.name}-keep-alive")
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
                self._abandon()
            else:
                await self.drain()
        except asyncio.CancelledError:
            self._abandon()
            raise
        finally:
            self._keep_alive.cancel()

    async def pull(self, stop: asyncio.Event) -> None:
        """Take as many jobs as there is room for and start each, until `stop` is set."""
        async for batch in self._pull.batches(stop, lambda: self.room, self.config.pull_expires):
            for msg in batch:
                await self._admit(msg)

    async def drain(self) -> None:
        """Hand back the jobs that have not started (another runner takes them at once), give
        started ones `shutdown_grace` seconds to finish, then cut short the rest (FAILED)."""
        self._draining = True
        for job in self.jobs():
            if job.state is JobState.WAITING:
                self._interrupt(job, Interrupt.SHUTDOWN)
        tasks = [job.task for job in self.jobs()]
        if not tasks:
            return
        log.info("%s: waiting up to %.0fs for %d jobs", self.kind.name, self.config.shutdown_grace, len(tasks))
        _, late = await asyncio.wait(tasks, timeout=self.config.shutdown_grace)
        for job in self.jobs():
            self._interrupt(job, Interrupt.SHUTDOWN)
        if late:
            await asyncio.wait(late)

    def cancel(self, job_id: str, reason: str = "") -> None:
        """Cancel a job: a running one's handler gets `CancelledError` (`job.interrupt` is
        CANCEL); one not pulled yet is remembered for `cancel_memory` seconds and dropped when
        pulled."""
        job = self._jobs.get(job_id)
        if job is not None:
            log.info("cancelling %s %s: %s", self.kind.name, job_id, reason)
            if job.state.running and job.interrupt is None:
                job.cancel_reason = reason
            self._interrupt(job, Interrupt.CANCEL)
            return
        self._cancelled.add(job_id, reason)

    # -- one delivery ----------------------------------------------------------------------

    async def _admit(self, msg: Delivery) -> None:
        if self.room == 0:
            await _settle(msg, "nak")  # asked for before the room went (held, draining): for another runner
            return
        job = await self._receive(msg)
        if job is None:
            return
        if job.id in self._jobs:
            return  # a redelivery of a job running here: the running delivery settles it
        reason = self._cancelled.pop(job.id)
        if reason is None and (heard := self._cancel_heard(job)) is not None:
            reason = heard.reason
        if reason is not None:
            job.cancel_reason = reason
            await self._drop(job, JobState.CANCELLED)
        elif job.expired():
            await self._drop(job, JobState.EXPIRED)
        else:
            self._launch(job)

    async def _receive(self, msg: Delivery) -> Job[B] | None:
        try:
            body = self.kind.decode(msg.data)
        except MessageError as err:
            log.warning("%s: terminated stream sequence %d, which does not validate: %s",
                        self.kind.name, msg.seq, err)
            await _settle(msg, "term")
            await _call(self._on_invalid, msg.data, err)
            return None
        return Job(msg, body, self.kind.job_id(body), self.kind.deadline(body))

    async def _drop(self, job: Job[B], state: JobState) -> None:
        job.state = state
        log.info("%s %s (stream sequence %d) %s before it ran", self.kind.name, job.id, job.sequence, state.value)
        await _settle(job.msg, "term")
        await _call(self._on_dropped, job)

    def _launch(self, job: Job[B]) -> None:
        job.state = JobState.WAITING
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job), name=f"{self.kind.name}:{job.id}")
        self._on_active_change()

    async def _run(self, job: Job[B]) -> None:
        raised: BaseException | None = None
        try:
            await self._handler(job)
        except (asyncio.CancelledError, Exception) as err:  # this task is ours: we settle it
            raised = err
        try:
            await self._end(job, raised)
        finally:
            self._forget(job)

    async def _end(self, job: Job[B], raised: BaseException | None) -> None:
        state, action = ending(job, raised)
        if state is JobState.HANDED_BACK and isinstance(raised, HandBack):
            self._held = self._held or (raised.hold_pulls and self.active > 1)
        job.state = state
        if action is not None and not job.settled:
            job.settled = True
            await _settle(job.msg, action, delay=raised.delay if isinstance(raised, HandBack) else None)
        if state is JobState.FAILED:
            job.error = raised if isinstance(raised, Exception) else RuntimeError(
                f"still running when the shutdown grace ({self.config.shutdown_grace:.0f}s) ended")
            log.error("%s %s (stream sequence %d, delivery %d) failed%s: %s", self.kind.name, job.id,
                      job.sequence, job.delivery, "" if action is None else " before it started, terminated",
                      job.error, exc_info=job.error if job.error is raised else None)
            await _call(self._on_failed, job)
        elif state is JobState.REFUSED:
            log.info("%s %s (stream sequence %d) refused: %s", self.kind.name, job.id, job.sequence, raised)
        elif state is JobState.HANDED_BACK:
            log.debug("%s %s (stream sequence %d, delivery %d) handed back", self.kind.name, job.id,
                      job.sequence, job.delivery)

    def _forget(self, job: Job[B]) -> None:
        self._jobs.pop(job.id, None)
        if job.state is not JobState.HANDED_BACK or not self._jobs:
            self._held = False  # room freed; with no job left, nothing else would free it
        self._pull.room_freed()
        self._on_active_change()

    def _interrupt(self, job: Job[B], why: Interrupt) -> None:
        if job.state.running:
            job.interrupt = job.interrupt or why
            job.task.cancel()
            if job.interrupt is Interrupt.CANCEL and job.state is JobState.WAITING and not job.settled:
                # its end is decided (terminated): tell JetStream now, not when the handler ends
                job.settled = True
                self._settling.add(task := asyncio.create_task(_settle(job.msg, "term")))
                task.add_done_callback(self._settling.discard)

    def _abandon(self) -> None:
        for job in self.jobs():
            self._interrupt(job, Interrupt.ABANDON)

    async def _keep_waiting_alive(self) -> None:
        """While a job waits to start, keep JetStream from delivering it to another runner. A
        failed send (the connection is down) is retried at the next tick. An interrupted job
        whose handler still runs is cancelled again instead (its cancel was lost)."""
        while True:
            await asyncio.sleep(self.config.keep_alive)
            for job in self.jobs():
                if job.interrupt is not None and job.state.running:
                    job.task.cancel()
                    continue
                if job.state is not JobState.WAITING:
                    continue
                try:
                    await job.msg.in_progress()
                except Exception as err:
                    log.debug("in_progress for %s %s failed: %s", self.kind.name, job.id, err)


async def _settle(msg: Delivery, action: Settle, delay: float | None = None) -> None:
    """Tell JetStream. A failure (the connection is down) is logged, not raised: JetStream
    delivers again, after its ack_wait, whatever this did not settle."""
    try:
        if action == "nak":
            await msg.nak(delay=delay)
        else:
            await getattr(msg, action)()
    except Exception as err:
        log.warning("could not %s stream sequence %d: %s", action, msg.seq, err)


T = TypeVar("T")


class _Recent(Generic[T]):
    """Items by key, each kept `ttl` seconds after it was added."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._items: dict[str, tuple[float, T]] = {}  # insertion order is arrival order

    def add(self, key: str, item: T) -> None:
        now = time.monotonic()
        self._items.pop(key, None)
        self._items[key] = (now, item)
        while now - next(iter(self._items.values()))[0] > self.ttl:
            del self._items[next(iter(self._items))]

    def pop(self, key: str) -> T | None:
        entry = self._items.pop(key, None)
        return None if entry is None else entry[1]

    def values(self) -> list[T]:
        return [item for _, item in self._items.values()]


async def _call(hook: Callable[..., Awaitable[None]] | None, *args) -> None:
    """A hook that fails is logged: it must not stop the runner or leave a job unsettled."""
    if hook is None:
        return
    try:
        await hook(*args)
    except Exception:
        log.exception("job hook %s failed", getattr(hook, "__qualname__", hook))



