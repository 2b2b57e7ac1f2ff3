"""The job runner: pull work from a durable JetStream consumer, only as much as there is room
for, run each job in its own task, and settle every delivery (ack, nak or term) exactly once.

Workers run generation requests on it; the judge and the trainer run their jobs on it. It knows
nothing of what a job does: a `JobKind` says how to read one (its pydantic model, its id, its
deadline), and a handler, `async def handle(job)`, does the work.

A job's life (`JobState`), and what JetStream is told:

    pulled --(does not validate)--------------------> term; `on_invalid` may answer it (no Job)
      |
    RECEIVED --(cancelled before it was pulled)-----> CANCELLED    term, `on_dropped`
      |      --(past its deadline)------------------> EXPIRED      term, `on_dropped`
      v
    WAITING    the handler runs; `in_progress` every `keep_alive` seconds
      |  --(handler returns)------------------------> DONE         ack
      |  --(handler raises HandBack)----------------> HANDED_BACK  nak, after its delay
      |  --(drain)----------------------------------> HANDED_BACK  nak: another runner takes it now
      |  --(handler raises Refuse)------------------> REFUSED      term
      |  --(cancel)---------------------------------> CANCELLED    term at once, whatever the handler does
      |  --(handler raises anything else)-----------> FAILED       term, `on_failed`
      |
      | await job.start()                                          ack
      v
    STARTED
         --(handler returns)------------------------> DONE
         --(cancel)---------------------------------> CANCELLED
         --(handler raises, or still runs when
            the drain's grace ends)-----------------> FAILED       `on_failed`

    WAITING or STARTED --(the runner's own task is cancelled)--> ABANDONED: nothing is sent;
                          JetStream redelivers an unstarted job after its ack_wait, as if the
                          process had died

"Started" is the moment a job stops being the stream's and becomes this runner's. Before it, a
runner that dies, drains or hands the job back leaves it to another runner: nothing is lost,
and nothing has been done twice that matters. After it (the ack), JetStream will never deliver
the job again, so the runner must finish it or report it failed. The handler says when with
`await job.start()`: a generation at its first token (the client has seen output; a redelivery
would answer twice); a judge or training job as soon as it is accepted, once it publishes
progress events of its own (a redelivery would run it twice). Until then the runner keeps the
delivery alive with `in_progress`; a handler that returns without starting has finished the
job, and it is acked then.

The rules for a handler that raises, chosen so that no job is lost silently:

- before `start()`: the job is terminated (never redelivered), marked FAILED, logged with its
  stream sequence and passed to `on_failed`. The exception is the handler's verdict on this job,
  and consumers redeliver without limit: a job that crashes its handler would otherwise crash
  every runner in turn, forever. A handler that knows a failure is transient (a peer down,
  memory short) raises `HandBack` instead, and the job goes back to the stream.
- after `start()`: the job was acked and nobody else will run it; it is FAILED, logged and
  passed to `on_failed` (the judge and the trainer publish a failure event there; the worker
  has already sent its client an error chunk).

Handlers must let `asyncio.CancelledError` propagate; `job.interrupt` says why they were
cancelled (`Interrupt.CANCEL`, `SHUTDOWN` or `ABANDON`), for whatever they tell their requester.
An interrupted handler that is still running at the next keep-alive tick is cancelled again (a
cancel can be lost inside a library: Python 3.11's `wait_for` swallows one that lands as its
awaitable finishes), and an interrupted job can no longer `start()`. A cancel that a runner
heard (`serve`) is remembered for `cancel_memory` seconds, and a job it names that is pulled
later (a judge job's parts) is dropped unrun.

Use a runner as a context manager: `async with runner: await runner.pull(stop)`. Leaving the
block drains it (`drain()`: unstarted jobs handed back, started ones given `shutdown_grace`
seconds); a cancelled block abandons its jobs instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Awaitable, Callable, Generic, Literal, TypeVar

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError
from pydantic import BaseModel

from .events import JobCancel
from .messages import MessageError, decode

log = logging.getLogger(__name__)

B = TypeVar("B", bound=BaseModel)
Settle = Literal["ack", "nak", "term"]


class JobState(Enum):
    """Where a job is in its life (the module docstring's diagram). Its handler runs while it is
    WAITING or STARTED; the other states after RECEIVED are final."""

    RECEIVED = "received"  # pulled and valid; not yet handed to the handler
    WAITING = "waiting"  # the handler runs; not started, so still the stream's to redeliver
    STARTED = "started"  # acked: this runner's alone, to finish or to report failed
    DONE = "done"
    HANDED_BACK = "handed_back"  # nak'd: JetStream delivers it again
    REFUSED = "refused"  # terminated: the handler said it can never be done as asked
    EXPIRED = "expired"  # terminated: past its deadline when pulled
    CANCELLED = "cancelled"  # terminated if it had not started
    FAILED = "failed"  # the handler raised (terminated if it had not started)
    ABANDONED = "abandoned"  # the runner was cancelled with it: nothing sent

    @property
    def running(self) -> bool:
        return self in (JobState.WAITING, JobState.STARTED)


class Interrupt(Enum):
    """Why the runner cancelled a job's handler."""

    CANCEL = "cancel"  # its requester cancelled it
    SHUTDOWN = "shutdown"  # the runner drains (the job had not started, or outlived the grace)
    ABANDON = "abandon"  # the runner's own task was cancelled


class HandBack(Exception):
    """Raised by a handler before `start()`: give the job back to JetStream, to be delivered
    again after `delay` seconds. With `hold_pulls`, this runner pulls nothing more until one of
    its other jobs ends (the worker: the request did not fit the KV cache next to the running
    ones, so pulling more would only hand more back)."""

    def __init__(self, delay: float = 0.0, *, hold_pulls: bool = False):
        super().__init__(f"handed back, to be delivered again in {delay}s")
        self.delay = delay
        self.hold_pulls = hold_pulls


class Refuse(Exception):
    """Raised by a handler before `start()`: the job can never be done as asked (the handler has
    told its requester why). It is terminated, and it is not a failure."""


@dataclass(frozen=True)
class JobKind(Generic[B]):
    """How a runner reads one kind of job from its stream."""

    name: str  # in log lines: "generation", "judge", ...
    model: type[B]
    job_id: Callable[[B], str]  # unique per job; cancels name it
    deadline: Callable[[B], float | None] = lambda body: None  # unix time; None: none


@dataclass(frozen=True)
class RunnerConfig:
    capacity: int  # jobs run at once; the runner never pulls more than it has room for
    keep_alive: float = 1.0  # seconds between in_progress for an unstarted job: well under ack_wait
    shutdown_grace: float = 30.0  # seconds started jobs get to finish when the runner drains
    fetch_timeout: float = 1.0  # longest wait of one fetch: how long `stop` may go unnoticed
    cancel_memory: float = 600.0  # seconds a cancel for a job not yet pulled is remembered

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        if min(self.keep_alive, self.fetch_timeout, self.cancel_memory) <= 0 or self.shutdown_grace < 0:
            raise ValueError("keep_alive, fetch_timeout and cancel_memory must be positive, shutdown_grace not negative")


@dataclass(eq=False)
class Job(Generic[B]):
    """One delivery of a job, from its pull to its settlement. The runner settles it; the handler
    reads `body` and says when it has started."""

    msg: Msg = field(repr=False)
    body: B = field(repr=False)
    id: str
    deadline: float | None = None
    state: JobState = JobState.RECEIVED
    interrupt: Interrupt | None = None
    cancel_reason: str = ""  # the cancel's reason, when `interrupt` is CANCEL or it was dropped CANCELLED
    settled: bool = False  # JetStream was told already (a cancelled job is terminated at once)
    error: BaseException | None = None  # why it FAILED
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def started(self) -> bool:
        return self.state is JobState.STARTED

    @property
    def delivery(self) -> int:
        """1 for the first delivery, 2 for the first redelivery, ..."""
        return self.msg.metadata.num_delivered

    @property
    def sequence(self) -> int:
        """The message's sequence in its stream: how logs name a job."""
        return self.msg.metadata.sequence.stream

    @property
    def ack_subject(self) -> str:
        return self.msg.reply

    def expired(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    async def start(self) -> None:
        """The job is this runner's now: ack it, so JetStream never delivers it again. An
        interrupted job cannot start: its cancel is raised here (again, if it was lost)."""
        if self.interrupt is not None and self.state is JobState.WAITING:
            raise asyncio.CancelledError(f"{self.id} was interrupted ({self.interrupt.value})")
        if self.state is JobState.WAITING:
            self.state = JobState.STARTED
            await self.msg.ack()


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
        psub: JetStreamContext.PullSubscription,
        kind: JobKind[B],
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
        self._psub = psub
        self._handler = handler
        self._on_invalid = on_invalid
        self._on_dropped = on_dropped
        self._on_failed = on_failed
        self._on_active_change = on_active_change or (lambda: None)
        self._jobs: dict[str, Job[B]] = {}  # running, by job id
        self._cancelled: _Recent[str] = _Recent(config.cancel_memory)  # jobs cancelled before they were pulled: reasons
        self._heard: _Recent[JobCancel] = _Recent(config.cancel_memory)  # the cancels `serve` heard
        self._cancels_job: Callable[[Job[B], JobCancel], bool] = lambda job, cancel: False
        self._room_freed = asyncio.Event()
        self._held = False  # a job was handed back with hold_pulls and others still run
        self._draining = False
        self._keep_alive: asyncio.Task | None = None
        self._settling: set[asyncio.Task] = set()  # terms sent at a cancel, held until sent

    @property
    def active(self) -> int:
        return len(self._jobs)

    @property
    def room(self) -> int:
        """How many jobs the next fetch may ask for."""
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
        watcher = asyncio.create_task(self._cancel_when_asked(cancels, cancels_job), name=f"{self.kind.name}-cancels")
        try:
            async with self:
                await self.pull(stop)
        finally:
            watcher.cancel()

    async def _cancel_when_asked(self, cancels: asyncio.Queue, cancels_job: Callable[[Job[B], JobCancel], bool]) -> None:
        while True:
            cancel = await cancels.get()
            if not isinstance(cancel, JobCancel):
                continue
            self._heard.add(cancel.id, cancel)
            for job in self.jobs():
                if cancels_job(job, cancel):
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
        """Fetch as many jobs as there is room for and start each, until `stop` is set."""
        while not stop.is_set():
            room = self.room
            if room == 0:
                self._room_freed.clear()
                await _wait_any(self._room_freed, stop)
                continue
            for msg in await self._fetch(room):
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

    async def _fetch(self, room: int) -> list[Msg]:
        try:
            return await self._psub.fetch(room, timeout=self.config.fetch_timeout)
        except (asyncio.TimeoutError, NatsTimeout):
            return []
        except (ServiceUnavailableError, NoRespondersError) as err:
            # JetStream has no leader for the consumer right now (a cluster electing one after
            # losing a node, or one just created): nothing to take yet, ask again shortly
            log.debug("%s: fetch not answered (%s); asking again", self.kind.name, type(err).__name__)
            await asyncio.sleep(min(0.2, self.config.fetch_timeout))
            return []

    async def _admit(self, msg: Msg) -> None:
        if self._draining or self.active >= self.config.capacity:
            await _settle(msg, "nak")  # more than we asked for: for another runner, or us later
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

    async def _receive(self, msg: Msg) -> Job[B] | None:
        try:
            body = decode(self.kind.model, msg.data)
        except MessageError as err:
            log.warning("%s: terminated stream sequence %d, which does not validate: %s",
                        self.kind.name, msg.metadata.sequence.stream, err)
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
        state, action = _ending(job, raised)
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
        self._room_freed.set()
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


def _ending(job: Job, raised: BaseException | None) -> tuple[JobState, Settle | None]:
    """The state a job ends in, and what JetStream is told, from where it was when its handler
    ended (started or not) and how it ended (returned, raised, or interrupted and why)."""
    started = job.started
    why = job.interrupt or (Interrupt.ABANDON if isinstance(raised, asyncio.CancelledError) else None)
    if why is Interrupt.ABANDON:
        return JobState.ABANDONED, None
    if why is Interrupt.CANCEL:
        return JobState.CANCELLED, None if started else "term"
    if why is Interrupt.SHUTDOWN:
        return (JobState.FAILED, None) if started else (JobState.HANDED_BACK, "nak")
    if raised is None:
        return JobState.DONE, None if started else "ack"
    if started:
        return JobState.FAILED, None  # acked: nobody else will run it, so it is reported
    if isinstance(raised, HandBack):
        return JobState.HANDED_BACK, "nak"
    if isinstance(raised, Refuse):
        return JobState.REFUSED, "term"
    return JobState.FAILED, "term"


async def _settle(msg: Msg, action: Settle, delay: float | None = None) -> None:
    """Tell JetStream. A failure (the connection is down) is logged, not raised: JetStream
    delivers again, after its ack_wait, whatever this did not settle."""
    try:
        if action == "nak":
            await msg.nak(delay=delay)
        else:
            await getattr(msg, action)()
    except Exception as err:
        log.warning("could not %s stream sequence %d: %s", action, msg.metadata.sequence.stream, err)


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


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def until_stopped(coro, stop: asyncio.Event) -> bool:
    """Run `coro` (a job's client following it, say) unless `stop` comes first (then cancel
    it): True when it finished."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
