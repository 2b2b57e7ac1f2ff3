"""The judge as a service on a real fabric: judge jobs on JOBS, progress and results on EVENTS,
records in the object store. Two services share a job, a killed one leaves its work to the
other, a finished job is not run again, a cancel stops a job within seconds, a failing endpoint
fails the job saying why. The contestants and the judge are the deterministic server of
`judge_fake.py`, except in the last test, where SmolLM2 answers and judges through a real
gateway and worker (its judgments are poor: the test checks the machinery, not the scores)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest
import pytest_asyncio

from chatfabric.judge.store import done_key
from chatfabric.proto import subjects
from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.events import JobCancel, JobProgress, JobResult, JudgeJob
from conftest import CHATFABRIC, MODEL
from judge_fake import FakeOpenAI

WRITING = (81, 82, 83, 84, 85, 86)
_names = iter(range(10**6))


@pytest_asyncio.fixture
async def bus(fabric):
    async with connect(BusConfig.from_env(url=fabric.nats_url), name="judge-test") as b:
        await b.ensure_contract()  # as a gateway would
        yield b


@pytest.fixture
def services(fabric):
    """services(n, fake_url) -> judge service processes; all stopped at the end of the test."""
    started = []

    def start(count: int, gateway_url: str, *extra: str):
        procs = [fabric._spawn("judge", ["judge", "serve", "--nats-url", fabric.nats_url, "--gateway-url", gateway_url,
                                         "--log-level", "INFO", *extra]) for _ in range(count)]
        started.extend(procs)
        return procs

    yield start
    for proc in started:
        proc.stop()


def job(fake_url: str, **fields) -> JudgeJob:
    base = dict(models=("m-a",), judge_model="j", questions=WRITING, gateway_url=fake_url,
                name=f"test-job-{next(_names)}-{time.time_ns()}")
    return JudgeJob(**{**base, **fields})


async def submitted(bus, body: JudgeJob, timeout: float = 90.0, on_progress=None) -> JobResult:
    """Publish the job and wait for its result event."""
    async with bus.follow_job_events(subjects.job_events(body.job_name), since=time.time() - 1) as events:
        await bus.publish_event(body)
        return await next_result(events, timeout, on_progress)


async def next_result(events: asyncio.Queue, timeout: float, on_progress=None) -> JobResult:
    async with asyncio.timeout(timeout):
        while True:
            event = await events.get()
            if isinstance(event, JobResult):
                return event
            if isinstance(event, JobProgress) and on_progress is not None:
                await on_progress(event)


async def record(bus, name: str, key: str) -> dict | None:
    data = await bus.read_artifact(subjects.JUDGE_BUCKET, f"judge/{name}/{key}")
    return None if data is None else json.loads(data)


def counts(requests: list[dict], key) -> dict:
    seen: dict = {}
    for r in requests:
        seen[key(r)] = seen.get(key(r), 0) + 1
    return seen


def answer_key(r: dict) -> tuple:
    return r["model"], r["messages"][0]["content"][:24], sum(m["role"] == "user" for m in r["messages"])


def judge_key(r: dict) -> str:
    return r["messages"][1]["content"]


async def test_two_services_share_one_job_without_doing_anything_twice(bus, services):
    gate = asyncio.Event()
    # requests are held until 3 wait at once: more than one service (capacity 2) can have
    async with FakeOpenAI(judge=lambda p: "[[6]]", gate=gate, open_at=3) as fake:
        services(2, fake.url, "--capacity", "2")
        body = job(fake.url)
        result = await submitted(bus, body)
        assert result.ok, result.error
        assert result.summary["score:m-a"] == 6.0 and result.summary["judgments"] == 12
        by = {(await record(bus, body.job_name, done_key(q)))["by"] for q in WRITING}
        assert len(by) == 2  # both services judged
        assert set(counts(fake.answer_requests(), answer_key).values()) == {1}
        assert len(fake.answer_requests()) == 12 and len(fake.judge_requests()) == 12
        assert set(counts(fake.judge_requests(), judge_key).values()) == {1}

        before = len(fake.requests)
        again = await submitted(bus, body.model_copy(update={"id": "rerun-" + body.id[:20], "at": time.time()}))
        assert again.ok and len(fake.requests) == before  # a finished job is not run again
        assert again.artifacts == result.artifacts  # the same results, byte for byte


async def test_a_killed_service_leaves_the_job_to_another(bus, services):
    gate = asyncio.Event()
    last = "Write a persuasive email"[:24]  # question 84's first turn: held until the kill
    async with FakeOpenAI(gate=gate, held=lambda b: b["messages"][0]["content"].startswith("Write a persuasive")) as fake:
        [first] = services(1, fake.url, "--capacity", "2")
        body = job(fake.url)
        progressed = asyncio.Event()

        async def on_progress(event: JobProgress) -> None:
            if event.done >= 1 and any(answer_key(r)[1] == last for r in fake.requests):
                progressed.set()

        async with bus.follow_job_events(subjects.job_events(body.job_name), since=time.time() - 1) as events:
            await bus.publish_event(body)
            waiter = asyncio.create_task(next_result(events, 120, on_progress))
            await asyncio.wait_for(progressed.wait(), 60)
            done_before = {q for q in WRITING if await record(bus, body.job_name, done_key(q))}
            first.signal(signal.SIGKILL)
            first.popen.wait(10)
            [second] = services(1, fake.url, "--capacity", "2")
            gate.set()
            result = await waiter
        assert result.ok, result.error
        assert result.summary["judgments"] == 12 and result.summary["failed:m-a"] == 0
        per_answer = counts(fake.answer_requests(), answer_key)
        asked_twice = {k for k, n in per_answer.items() if n > 1}
        assert all(k[1] == last for k in asked_twice), asked_twice  # only what was in flight at the kill
        assert len(per_answer) == 12 and len(done_before) >= 1  # questions done before it: reused
        finishers = {(await record(bus, body.job_name, done_key(q)))["by"] for q in WRITING}
        assert len(finishers) == 2 and len(done_before) >= 1


async def test_a_cancelled_job_stops_within_seconds(bus, services, fabric):
    gate = asyncio.Event()
    async with FakeOpenAI(gate=gate) as fake:
        services(1, fake.url, "--capacity", "2")
        body = job(fake.url)
        async with bus.follow_job_events(subjects.job_events(body.job_name), since=time.time() - 1) as events:
            await bus.publish_event(body)
            await asyncio.wait_for(fake.arrived.wait(), 60)
            cancelled_at = time.monotonic()
            await bus.publish_event(JobCancel(job_id=body.job_name, kind="judge", reason="test"))
            result = await next_result(events, 60)
        assert not result.ok and result.error.startswith("cancelled"), result.error
        assert time.monotonic() - cancelled_at < 10

        async def settled() -> bool:  # every part acked or terminated: none waiting, none taken
            info = await bus.js.consumer_info(subjects.JOBS_STREAM, subjects.JUDGE_CONSUMER)
            return (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)

        try:
            async with asyncio.timeout(5):  # within seconds of the cancel, not after an ack_wait
                while not await settled():
                    await asyncio.sleep(0.1)
        except TimeoutError:
            info = await bus.js.consumer_info(subjects.JOBS_STREAM, subjects.JUDGE_CONSUMER)
            raise AssertionError(f"parts left: pending {info.num_pending}, un-acked {info.num_ack_pending}, "
                                 f"redelivered {info.num_redelivered}") from None
        asked = len(fake.requests)
        assert asked <= 2 * 2  # at most what was in flight: no new work after the cancel


async def test_a_job_that_cannot_finish_publishes_why(bus, services):
    async with FakeOpenAI(statuses=[500] * 1000) as fake:
        services(1, fake.url, "--max-retries", "1")
        result = await submitted(bus, job(fake.url, questions=(81,)))
    assert not result.ok
    assert "HTTP 500: canned 500" in result.error and "question 81" in result.error


def test_smollm2_answers_and_judges_through_the_fabric(fabric, stack, services, tmp_path):
    """The real thing, small: 2 questions (one reference-graded), short answers and judgments."""
    services(1, f"{stack}/v1")
    out = tmp_path / "results"
    run = subprocess.run(
        [CHATFABRIC, "judge", "run", "--nats-url", fabric.nats_url, "--questions", "81,101", "--models", MODEL,
         "--judge-model", MODEL, "--max-tokens", "16", "--judge-max-tokens", "24", "--judge-retries", "0",
         "--gateway-url", f"{stack}/v1", "--output", str(out), "--no-progress", "--name", f"smollm2-{time.time_ns()}"],
        env=fabric.env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    [entry] = summary["models"]
    assert entry["model"] == MODEL and entry["overall"]["n"] + entry["overall"]["failed"] == 4
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert {(j["question_id"], j["turn"], j["judge"][1]) for j in judgments} == {
        (81, 1, "single-v1"), (81, 2, "single-v1-multi-turn"),
        (101, 1, "single-math-v1"), (101, 2, "single-math-v1-multi-turn")}
    assert "Mode: single" in run.stdout and MODEL in run.stdout
    (tmp_path / "table.txt").write_text(run.stdout)  # docs/judge.md shows one such table
