"""The job runner (`proto/jobs.py`) against a real nats-server: one work-queue stream and one
durable consumer per test, handlers scripted per job, and the stream's own state (what is still
stored, pending or un-acked) as the witness of every ack, nak and term."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import subprocess
import sys
import time

import nats
import pytest
from nats.js import api
from pydantic import BaseModel

from chatfabric.proto.embedded import EmbeddedServer, free_port
from chatfabric.proto.events import JobCancel
from chatfabric.proto.pull import Pull
from chatfabric.proto.job_runner import JobRunner
from chatfabric.proto.jobs import HandBack, Interrupt, Job, JobSpec, JobState, Refuse, RunnerConfig

ACK_WAIT = 1.0  # seconds: short, so that a redelivery (or its absence) shows within the test
PULL_EXPIRES = 0.3
HAND_BACK_DELAY = 0.2


class Task(BaseModel):
    id: str
    action: str = "wait"  # what the scripted handler does, see `Script.handle`
    deadline: float | None = None


KIND = JobSpec("test", Task, job_id=lambda task: task.id, deadline=lambda task: task.deadline)
_numbers = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with EmbeddedServer(port=free_port(), store_dir=tmp_path_factory.mktemp("jobs-nats")) as srv:
        yield srv


class Script:
    """A handler that does what each job's `action` says and records what happened."""

    def __init__(self):
        self.calls: asyncio.Queue[Job] = asyncio.Queue()  # every time the handler is entered
        self.release = asyncio.Event()  # ends every "wait" and "start-wait" handler
        self.failed: list[Job] = []
        self.dropped: list[Job] = []
        self.invalid: list[bytes] = []

    async def handle(self, job: Job[Task]) -> None:
        action = job.body.action
        if action.startswith("start"):
            await job.start()
        await self.calls.put(job)
        if action.endswith("crash"):
            raise RuntimeError("the handler broke")
        if action == "refuse":
            raise Refuse("cannot be done as asked")
        if action == "hand-back" and job.delivery == 1:
            raise HandBack(HAND_BACK_DELAY, hold_pulls=True)
        if action.endswith("wait"):
            await self.release.wait()

    async def on_failed(self, job: Job) -> None:
        self.failed.append(job)

    async def on_dropped(self, job: Job) -> None:
        self.dropped.append(job)

    async def on_invalid(self, data: bytes, error) -> None:
        self.invalid.append(data)

    async def next_call(self, timeout: float = 5.0) -> Job[Task]:
        return await asyncio.wait_for(self.calls.get(), timeout)


class Queue:
    """One test's stream and consumer on the shared server."""

    def __init__(self, url: str, ack_wait: float = ACK_WAIT):
        n = next(_numbers)
        self.url, self.ack_wait = url, ack_wait
        self.stream, self.subject, self.durable = f"TESTJOBS_{n}", f"testjobs.{n}", f"testjobs-{n}"

    async def __aenter__(self) -> "Queue":
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        await self.js.add_stream(name=self.stream, subjects=[self.subject], retention=api.RetentionPolicy.WORK_QUEUE)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def subscribe(self, nc=None):
        nc = nc or self.nc
        config = api.ConsumerConfig(durable_name=self.durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.ack_wait)
        await nc.jetstream().add_consumer(self.stream, config)
        return await Pull(nc, self.stream, self.durable, "test").open()

    async def publish(self, *tasks: Task | bytes) -> None:
        for task in tasks:
            await self.js.publish(self.subject, task if isinstance(task, bytes) else task.model_dump_json().encode())

    async def stored(self) -> int:
        """Messages still in the stream: an ack or a term removes one (work-queue retention)."""
        return (await self.js.stream_info(self.stream)).state.messages

    async def consumer(self) -> api.ConsumerInfo:
        return await self.js.consumer_info(self.stream, self.durable)


@contextlib.asynccontextmanager
async def running(queue: Queue, script: Script, nc=None, **config):
    """A runner pulling from `queue` in a task; yields (runner, stop, task)."""
    config = {"keep_alive": 0.25, "pull_expires": PULL_EXPIRES, "shutdown_grace": 5.0, **config}
    runner = JobRunner(await queue.subscribe(nc), KIND, script.handle, RunnerConfig(**config),
                       on_invalid=script.on_invalid, on_dropped=script.on_dropped, on_failed=script.on_failed)
    stop = asyncio.Event()

    async def serve():
        async with runner:
            await runner.pull(stop)

    task = asyncio.create_task(serve())
    try:
        yield runner, stop, task
    finally:
        stop.set()
        script.release.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)


async def eventually(check, what: str, timeout: float = 5.0):
    """Poll a condition (sync or async) until it holds: for the server's state, which sends no
    events."""
    deadline = time.monotonic() + timeout
    while not await _value(check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def ended(job: Job, timeout: float = 5.0) -> JobState:
    """The job's final state, once the runner has settled it."""
    await asyncio.wait_for(asyncio.shield(job.task), timeout)
    return job.state


async def test_it_takes_no_more_than_its_capacity(server):
    script = Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=2) as (runner, _, _):
        await queue.publish(*(Task(id=f"j{i}") for i in range(5)))
        first = [await script.next_call(), await script.next_call()]
        info = await queue.consumer()
        assert (info.num_ack_pending, info.num_pending, runner.room) == (2, 3, 0)
        assert script.calls.empty()
        script.release.set()  # each handler returns without starting: finished, acked
        assert [await ended(job) for job in first] == [JobState.DONE] * 2
        for _ in range(3):
            await ended(await script.next_call())
        await eventually(lambda: stored_is(queue, 0), "every job to be acked")


async def test_a_job_is_acked_when_it_starts(server):
    script = Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=1):
        await queue.publish(Task(id="s", action="start-wait"))
        job = await script.next_call()
        await eventually(lambda: stored_is(queue, 0), "the started job to be acked")
        assert job.state is JobState.STARTED  # still running, and no longer the stream's
        script.release.set()
        assert await ended(job) is JobState.DONE


async def test_in_progress_keeps_an_unstarted_job_past_ack_wait(server):
    script, witness = Script(), Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=1):
        await queue.publish(Task(id="slow"))
        job = await script.next_call()
        async with running(queue, witness, capacity=1):
            with pytest.raises(asyncio.TimeoutError):  # 2.5 ack_waits without a redelivery
                await witness.next_call(timeout=2.5 * ACK_WAIT)
        assert job.state is JobState.WAITING and (await queue.consumer()).num_redelivered == 0
        script.release.set()
        assert await ended(job) is JobState.DONE


async def test_drain_hands_unstarted_jobs_to_another_runner_and_lets_started_ones_finish(server):
    script, other = Script(), Script()
    async with Queue(server.url, ack_wait=30) as queue:
        async with running(queue, script, capacity=2, shutdown_grace=0.5) as (runner, stop, task):
            await queue.publish(Task(id="unstarted"), Task(id="started", action="start-wait"))
            jobs = {job.id: job for job in [await script.next_call(), await script.next_call()]}
            await eventually(lambda: stored_is(queue, 1), "the started job to be acked")
            stop.set()
            await asyncio.wait_for(task, 5)  # drained: the grace (0.5 s) ran out on "started"
        assert jobs["unstarted"].state is JobState.HANDED_BACK
        assert jobs["unstarted"].interrupt is Interrupt.SHUTDOWN
        assert jobs["started"].state is JobState.FAILED and script.failed == [jobs["started"]]
        async with running(queue, other, capacity=1):  # long before ack_wait (30 s)
            again = await other.next_call()
            assert (again.id, again.delivery) == ("unstarted", 2)


async def test_a_message_that_does_not_validate_is_terminated_and_logged(server, caplog):
    script = Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=1):
        await queue.publish(b'{"id": 5}')
        await eventually(lambda: script.invalid, "the invalid hook")
        assert script.invalid == [b'{"id": 5}'] and script.calls.empty()
        await eventually(lambda: emptied(queue), "the message to be terminated")
    assert "terminated stream sequence 1, which does not validate" in caplog.text


async def test_a_job_past_its_deadline_is_terminated_not_served(server):
    script = Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=1):
        await queue.publish(Task(id="late", deadline=time.time() - 1))
        await eventually(lambda: script.dropped, "the dropped hook")
        assert [(job.id, job.state) for job in script.dropped] == [("late", JobState.EXPIRED)]
        await eventually(lambda: emptied(queue), "the job to be terminated")
        assert script.calls.empty()


async def test_cancel_a_running_job_and_one_not_yet_pulled(server):
    script = Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=2) as (runner, _, _):
        runner.cancel("queued", "the client left")
        await queue.publish(Task(id="queued"), Task(id="waiting"), Task(id="started", action="start-wait"))
        jobs = {job.id: job for job in [await script.next_call(), await script.next_call()]}
        assert set(jobs) == {"waiting", "started"}
        assert [(job.id, job.state) for job in script.dropped] == [("queued", JobState.CANCELLED)]
        for job in jobs.values():
            runner.cancel(job.id, "the client left")
            runner.cancel(job.id, "a second cancel")  # the first one's reason is the one kept
            assert await ended(job) is JobState.CANCELLED and job.interrupt is Interrupt.CANCEL
            assert job.cancel_reason == "the client left"
        await eventually(lambda: emptied(queue), "the unstarted one terminated, the started one acked")
        assert script.failed == []


async def test_a_cancelled_job_is_terminated_at_once_and_a_lost_cancel_is_repeated(server):
    """A handler that loses its cancel (as a library's `wait_for` can) and keeps waiting: the
    delivery is terminated at the cancel all the same, and the handler is cancelled again until
    it ends; it can no longer start."""
    script, swallowed = Script(), asyncio.Event()

    async def deaf(job: Job[Task]) -> None:
        await script.calls.put(job)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # lost: as if the cancel landed as an awaited reply arrived
        try:
            await job.start()
        except asyncio.CancelledError:
            pass  # lost again
        await asyncio.Event().wait()  # only a repeated cancel ends this

    script.handle = deaf
    async with Queue(server.url) as queue, running(queue, script, capacity=1) as (runner, _, _):
        await queue.publish(Task(id="deaf"))
        job = await script.next_call()
        runner.cancel("deaf", "the user cancelled it")
        await eventually(lambda: emptied(queue), "the delivery terminated at the cancel", timeout=ACK_WAIT)
        assert swallowed.is_set() and job.state is JobState.WAITING  # the handler still runs
        assert await ended(job) is JobState.CANCELLED
        info = await queue.consumer()
        assert (info.num_ack_pending, info.num_redelivered, info.num_pending) == (0, 0, 0)


async def test_a_job_named_by_a_cancel_heard_earlier_is_dropped_when_pulled(server):
    """`serve` remembers the cancels it heard: a part of a cancelled job pulled after the cancel
    never runs."""
    script, cancels = Script(), asyncio.Queue()
    async with Queue(server.url) as queue:
        runner = JobRunner(await queue.subscribe(), KIND, script.handle,
                           RunnerConfig(capacity=1, keep_alive=0.25, pull_expires=PULL_EXPIRES),
                           on_dropped=script.on_dropped)
        stop = asyncio.Event()
        serving = asyncio.create_task(runner.serve(stop, cancels, lambda job, c: job.id.startswith(c.job_id)))
        await queue.publish(Task(id="job-1-p0"))
        first = await script.next_call()
        await cancels.put(JobCancel(job_id="job-1", kind="judge", reason="stop"))
        assert await ended(first) is JobState.CANCELLED
        await queue.publish(Task(id="job-1-p1"), Task(id="job-2-p0"))
        other = await script.next_call()
        assert other.id == "job-2-p0"
        assert [(job.id, job.state) for job in script.dropped] == [("job-1-p1", JobState.CANCELLED)]
        script.release.set()
        stop.set()
        await asyncio.wait_for(serving, 10)
        await eventually(lambda: emptied(queue), "everything settled")


@pytest.mark.parametrize("action", ["crash", "start-crash"])
async def test_a_handler_that_crashes_fails_its_job_and_reports_it(server, caplog, action):
    """Before start the job is terminated (not redelivered: see the crash rule); after it, it
    was acked. Either way it is FAILED, logged and reported, never lost silently."""
    script = Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=1):
        await queue.publish(Task(id="c", action=action))
        job = await script.next_call()
        assert await ended(job) is JobState.FAILED
        assert script.failed == [job] and isinstance(job.error, RuntimeError)
        await eventually(lambda: emptied(queue), "the job to be settled for good")
    assert "test c (stream sequence 1, delivery 1) failed" in caplog.text
    assert ("before it started, terminated" in caplog.text) == (action == "crash")


async def test_a_refused_job_is_terminated_and_is_no_failure(server):
    script = Script()
    async with Queue(server.url) as queue, running(queue, script, capacity=1):
        await queue.publish(Task(id="r", action="refuse"))
        assert await ended(await script.next_call()) is JobState.REFUSED
        assert script.failed == []
        await eventually(lambda: emptied(queue), "the job to be terminated")


@pytest.mark.parametrize("how", ["task cancelled", "connection closed"])
async def test_a_killed_runner_leaves_its_unstarted_job_to_be_redelivered(server, how):
    script, other = Script(), Script()
    async with Queue(server.url) as queue:
        nc = await nats.connect(server.url)
        async with running(queue, script, nc=nc, capacity=1) as (_, _, task):
            await queue.publish(Task(id="orphan"))
            job = await script.next_call()
            if how == "task cancelled":
                task.cancel()
            else:
                await nc.close()
            async with running(queue, other, capacity=1):
                again = await other.next_call(timeout=5 * ACK_WAIT)
                assert (again.id, again.delivery) == ("orphan", 2)
        if how == "task cancelled":  # a closed connection goes unnoticed until the job settles
            assert job.state is JobState.ABANDONED
        await nc.close()


async def test_a_job_handed_back_holds_pulls_until_a_running_job_ends(server):
    """Capacity 2: once "too-big" is handed back there is room for one more, and only the hold
    keeps the runner from pulling "after"."""
    script = Script()
    async with Queue(server.url, ack_wait=30) as queue, running(queue, script, capacity=2) as (runner, _, _):
        await queue.publish(Task(id="running", action="start-wait"))
        running_job = await script.next_call()
        await queue.publish(Task(id="too-big", action="hand-back"))
        handed = await script.next_call()
        assert await ended(handed) is JobState.HANDED_BACK and runner.room == 0
        await queue.publish(Task(id="after"))
        with pytest.raises(asyncio.TimeoutError):  # an unheld runner would take it at once
            await script.next_call(timeout=2 * PULL_EXPIRES)
        assert (await queue.consumer()).num_pending == 1
        script.release.set()
        assert await ended(running_job) is JobState.DONE
        later = {(job.id, job.delivery) for job in [await script.next_call(), await script.next_call()]}
        assert later == {("too-big", 2), ("after", 1)}


async def _taking(pull: Pull, stop: asyncio.Event, room, taken: list, wait: float, batches: list | None = None):
    async for batch in pull.batches(stop, room, wait):
        taken.extend(batch)
        if batches is not None:
            batches.append(len(batch))


async def test_a_pull_keeps_its_room_asked_for_and_counts_what_is_owed_exactly(server):
    """The requests outstanding ask for the room and no more, through expiries (each ends with
    a status that gives back what it did not deliver) and deliveries (each takes one off)."""
    async with Queue(server.url, ack_wait=30) as queue:
        pull, stop, taken, batches = await queue.subscribe(), asyncio.Event(), [], []
        taking = asyncio.create_task(_taking(pull, stop, lambda: 3 - len(taken), taken, PULL_EXPIRES, batches))
        await eventually(lambda: batches.count(0) >= 3, "three requests to expire unfilled")
        assert pull.asked == 3 and (await queue.consumer()).num_waiting >= 1
        await queue.publish(Task(id="a"), Task(id="b"))
        await eventually(lambda: len(taken) == 2, "both to be pushed")
        await eventually(lambda: batches.count(0) >= 6, "three more expiries")
        assert pull.asked == 1  # room for one: asked for again after each expiry, never more
        await queue.publish(Task(id="c"), Task(id="d"))
        await eventually(lambda: len(taken) == 3, "the third to be pushed")
        assert (await queue.consumer()).num_pending == 1  # the fourth waits for room
        stop.set()
        await asyncio.wait_for(taking, 5)
        assert pull.asked == 0


async def test_a_pull_hands_back_what_arrives_while_it_stops(server):
    """Deliveries to a request still outstanding at `stop` are naked, not left to ack_wait (30s
    here); and the stop ends once nothing more is owed, not at the request's expiry."""
    async with Queue(server.url, ack_wait=30) as queue:
        pull, stop, taken = await queue.subscribe(), asyncio.Event(), []
        taking = asyncio.create_task(_taking(pull, stop, lambda: 3 - len(taken), taken, wait=20.0))
        await queue.publish(Task(id="held"))
        await eventually(lambda: len(taken) == 1, "the first to be pushed")
        stop.set()
        await queue.publish(Task(id="late-1"), Task(id="late-2"))  # to the request still open
        await asyncio.wait_for(taking, 5)  # well before the request's 20 s
        assert len(taken) == 1
        other, other_stop, retaken = await queue.subscribe(), asyncio.Event(), []
        retaking = asyncio.create_task(_taking(other, other_stop, lambda: 5, retaken, PULL_EXPIRES))
        await eventually(lambda: len(retaken) == 2, "the naked two to be taken again, long before ack_wait")
        assert sorted((Task.model_validate_json(d.data).id, d.delivered) for d in retaken) == [
            ("late-1", 2), ("late-2", 2)]
        other_stop.set()
        await asyncio.wait_for(retaking, 5)


@pytest.mark.parametrize("module", ["chatfabric.proto.jobs", "chatfabric.worker.service"])
def test_the_bus_facing_side_does_not_import_torch(module):
    """Judges, trainers' controllers and workers' NATS side start without torch's seconds of
    import (layers: only backends and engines import it)."""
    probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def _value(value):
    return await value if inspect.isawaitable(value) else value


async def stored_is(queue: Queue, count: int) -> bool:
    return await queue.stored() == count


async def emptied(queue: Queue) -> bool:
    """Settled for good: nothing stored, nothing owed to anyone. An ack or a term is a plain
    publish, which JetStream applies a moment after the runner has sent it."""
    info = await queue.consumer()
    return (await queue.stored(), info.num_ack_pending, info.num_pending) == (0, 0, 0)


@pytest.fixture(autouse=True)
def _runner_logs(caplog):
    caplog.set_level(logging.INFO, logger="chatfabric.proto.jobs")
