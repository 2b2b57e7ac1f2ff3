"""Jobs and their life on the job runner (`proto/job_runner.py`), which pulls work from a durable
JetStream consumer, only as much as there is room for, runs each job in its own task, and
settles every delivery (ack, nak or term) exactly once.

Workers run generation requests on it; the judge and the trainer run their jobs on it. It knows
nothing of what a job does: a `JobSpec` says how to read one (its pydantic model, its id, its
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
from typing import Callable, Generic, Literal, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from .messages import MessageError, explain
from .pull import Delivery


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
class JobSpec(Generic[B]):
    """How a runner reads one kind of job from its stream."""

    name: str  # in log lines: "generation", "judge", ...
    model: type[B]  # or a union of message types (`Annotated[A | B, ...]`): what its subject carries
    job_id: Callable[[B], str]  # unique per job; cancels name it
    deadline: Callable[[B], float | None] = lambda body: None  # unix time; None: none

    def __post_init__(self) -> None:
        object.__setattr__(self, "_adapter", TypeAdapter(self.model))

    def decode(self, data: bytes) -> B:
        """The job a message holds; MessageError saying why when it holds none."""
        try:
            return self._adapter.validate_json(data)
        except ValidationError as err:
            raise MessageError(f"invalid {self.name} job: {explain(err)}") from None


@dataclass(frozen=True)
class RunnerConfig:
    capacity: int  # jobs run at once; the runner never pulls more than it has room for
    keep_alive: float = 1.0  # seconds between in_progress for an unstarted job: well under ack_wait
    shutdown_grace: float = 30.0  # seconds started jobs get to finish when the runner drains
    pull_expires: float = 1.0  # seconds each pull request lives: at `stop`, the longest wait for them to end
    cancel_memory: float = 600.0  # seconds a cancel for a job not yet pulled is remembered

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        if min(self.keep_alive, self.pull_expires, self.cancel_memory) <= 0 or self.shutdown_grace < 0:
            raise ValueError("keep_alive, pull_expires and cancel_memory must be positive, shutdown_grace not negative")


@dataclass(eq=False)
class Job(Generic[B]):
    """One delivery of a job, from its pull to its settlement. The runner settles it; the handler
    reads `body` and says when it has started."""

    msg: Delivery = field(repr=False)
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
        return self.msg.delivered

    @property
    def sequence(self) -> int:
        """The message's sequence in its stream: how logs name a job."""
        return self.msg.seq

    @property
    def ack_subject(self) -> str:
        return self.msg.ack_subject

    @property
    def stored_at(self) -> float | None:
        """When JetStream stored the job (unix seconds): its wait in the queue starts there."""
        return self.msg.stored_at

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


def ending(job: Job, raised: BaseException | None) -> tuple[JobState, Settle | None]:
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
