"""`chatfabric judge serve`: the judge service. Run any number; they share every job.

A submitted job (a `JudgeJob` on `jobs.judge`) is planned by whichever service pulls it: its
questions are stored as the job's plan and it is fanned out into one part per question, also on
`jobs.judge`, which every service pulls as it has room. A part does its question's work
(`pipeline.Judging`); the part that completes the last question collects every record and
publishes the results. Parts never call `start()`: until a part returns, its message stays the
stream's (kept alive by the runner), so a service that dies or is stopped leaves the part to
another, which resumes from the stored records. A job whose results exist is not run again:
its result event is published once more.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

from ..proto import tracing
from ..proto.bus import Bus
from ..proto.events import ArtifactRef, JobCancel, JobProgress, JobResult, JudgeJob
from ..proto.jobs import Interrupt, Job, JobKind, JobRunner, Refuse, RunnerConfig
from ..proto.subjects import JUDGE_BUCKET, job_cancel_subject
from . import store as keys
from .bench import Bench, bench_from_payload, load_bench
from .pipeline import Endpoints, Judging, check_references, collect, jsonl, summary_of
from .store import BusStore, RecordStore

log = logging.getLogger(__name__)
_tracer = tracing.tracer("chatfabric.judge")

JUDGE_JOBS = JobKind("judge", JudgeJob, job_id=lambda job: job.id)


@dataclass(frozen=True)
class ServiceConfig:
    gateway_url: str = "http://127.0.0.1:8000/v1"
    gateway_api_key: str | None = None
    judge_api_key: str | None = None
    capacity: int = 4  # parts at once
    max_retries: int = 5  # the SDK's retries (with backoff) of 429, 5xx, timeouts
    request_timeout: float = 600.0
    shutdown_grace: float = 10.0
    service_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.max_retries < 0 or self.request_timeout <= 0:
            raise ValueError("capacity must be at least 1, max_retries not negative, request_timeout positive")


def submission(job: JudgeJob) -> str:
    return job.part_of or job.id


def flat_summary(summary: dict) -> dict:
    """The headline numbers for the result event (the tables are in the artifacts)."""
    out = {"mode": summary["mode"], "questions": summary["job"]["questions"],
           "judgments": summary["job"]["judgments"]}
    for e in summary["models"]:
        if summary["mode"] == "single":
            out[f"score:{e['model']}"] = e["overall"]["mean"] if e["overall"]["mean"] is not None else "none"
            out[f"failed:{e['model']}"] = e["overall"]["failed"]
        else:
            rate = e["win_rate_adjusted"]
            out[f"win_rate_adjusted:{e['model']}"] = rate if rate is not None else "none"
            out[f"failed:{e['model']}"] = e["failed"]
    return out


class JudgeService:
    def __init__(self, bus: Bus, config: ServiceConfig):
        self.bus, self.config = bus, config
        self._limiters: dict[str, asyncio.Semaphore] = {}
        self._benches: dict[str, Bench] = {}  # by submission

    # -- a job's life ------------------------------------------------------------------------------

    async def handle(self, job: Job[JudgeJob]) -> None:
        body = job.body
        attributes = {"chatfabric.job": body.job_name, "chatfabric.judge_model": body.judge_model,
                      "chatfabric.part": body.part_of is not None, "chatfabric.delivery": job.delivery}
        with _tracer.start_as_current_span("judge.job", attributes=attributes):
            await self._handle(job, body)

    async def _handle(self, job: Job[JudgeJob], body: JudgeJob) -> None:
        cancel = await self._cancel_of(body)
        if cancel is not None:
            await self._publish_cancelled(body, cancel.reason)
            raise Refuse(f"cancelled: {cancel.reason}")
        try:
            if body.part_of is None:
                await self._plan(body)
            else:
                await self._run_part(body)
        except asyncio.CancelledError:
            if job.interrupt is Interrupt.CANCEL:
                await asyncio.shield(self._publish_cancelled(body, job.cancel_reason or "cancelled while running"))
            raise

    async def _plan(self, body: JudgeJob) -> None:
        store = BusStore(self.bus, body.job_name)
        if await self._republish_finished(body, store):
            return
        bench = await self._bench(body)
        check_references(bench)
        planned = [q.question_id for q in bench.questions]
        plan = await store.get(keys.PLAN_KEY)
        if plan is None:
            await store.put(keys.PLAN_KEY, {"questions": planned, "bench": bench.name})
        elif plan["questions"] != planned:
            raise ValueError(f"job {body.job_name} was planned with other questions; submit it under another name")
        done = await self._done(store, planned)
        await self._progress(body, len(done), len(planned), f"planned {len(planned)} questions")
        if len(done) == len(planned):
            await self._finish(body, bench, store)
            return
        part = body.model_copy(update={"bench_data": None, "bench_file": await self._bench_ref(body)})
        for index, q in enumerate(bench.questions):
            if q.question_id not in done:
                await self.bus.publish_event(part.model_copy(update={
                    "id": f"{body.id}-p{index}", "part_of": body.id, "questions": (q.question_id,)}))
        log.info("judge job %s: %d of %d questions to do, fanned out", body.job_name, len(planned) - len(done), len(planned))

    async def _run_part(self, body: JudgeJob) -> None:
        store = BusStore(self.bus, body.job_name)
        plan = await store.get(keys.PLAN_KEY)
        if plan is None:
            raise LookupError(f"job {body.job_name} has no plan: its parts cannot run")
        bench = (await self._bench(body)).subset(plan["questions"])
        question = bench.question(body.questions[0])
        endpoints = self._endpoints(body)
        try:
            judging = Judging(body, bench, store, endpoints, self._limiter(body), by=self.config.service_id)
            await judging.run_question(question)
        finally:
            await endpoints.close()
        done = await self._done(store, plan["questions"])
        await self._progress(body, len(done), len(plan["questions"]), f"question {question.question_id} judged")
        if len(done) == len(plan["questions"]):
            await self._finish(body, bench, store)

    async def _finish(self, body: JudgeJob, bench: Bench, store: BusStore) -> None:
        """Every question is done: the results, as artifacts and a result event. Whoever
        finishes last does it; two that finish together write the same bytes and the same
        event id, stored once."""
        answers, judgments = await collect(body, bench, store)
        summary = summary_of(body, bench, judgments)
        contents = {"summary": json.dumps(summary, indent=1, ensure_ascii=False).encode(),
                    "judgments": jsonl(judgments), "answers": jsonl(answers)}
        refs = [await self.bus.put_artifact(JUDGE_BUCKET, store.name(keys.RESULT_KEYS[k]), data) for k, data in contents.items()]
        await self._publish_result(body, refs, summary)
        log.info("judge job %s finished: %d judgments", body.job_name, len(judgments))

    async def _republish_finished(self, body: JudgeJob, store: BusStore) -> bool:
        stored = {k: await self.bus.read_artifact(JUDGE_BUCKET, store.name(name)) for k, name in keys.RESULT_KEYS.items()}
        if any(data is None for data in stored.values()):
            return False
        refs = [ArtifactRef(bucket=JUDGE_BUCKET, name=store.name(keys.RESULT_KEYS[k]), digest=f"sha256:{hashlib.sha256(d).hexdigest()}",
                            size=len(d)) for k, d in stored.items()]
        log.info("judge job %s is finished already: its result is published again", body.job_name)
        await self._publish_result(body, refs, json.loads(stored["summary"]))
        return True

    async def _publish_result(self, body: JudgeJob, refs: list[ArtifactRef], summary: dict) -> None:
        await self.bus.publish_event(JobResult(id=f"{submission(body)}-result", job_id=body.job_name, kind="judge",
                                               ok=True, artifacts=tuple(refs), summary=flat_summary(summary)))

    # -- hooks and cancels ---------------------------------------------------------------------------

    async def on_failed(self, job: Job[JudgeJob]) -> None:
        body = job.body
        where = f" (question {body.questions[0]!r})" if body.part_of else ""
        error = f"{type(job.error).__name__}: {job.error}{where}"
        await self.bus.publish_event(JobResult(job_id=body.job_name, kind="judge", ok=False, error=error[:4000]))

    async def on_dropped(self, job: Job[JudgeJob]) -> None:
        await self._publish_cancelled(job.body, job.cancel_reason or f"job {job.state.value} before it ran")

    @staticmethod
    def cancels(job: Job[JudgeJob], cancel: JobCancel) -> bool:
        """Whether `cancel` stops `job`: every part of the named judge job submitted before it."""
        return cancel.kind == "judge" and job.body.job_name == cancel.job_id and job.body.at <= cancel.at

    async def _cancel_of(self, body: JudgeJob) -> JobCancel | None:
        cancel = await self.bus.last_event(JobCancel, job_cancel_subject(body.job_name))
        return cancel if cancel is not None and cancel.kind == "judge" and cancel.at >= body.at else None

    async def _publish_cancelled(self, body: JudgeJob, reason: str) -> None:
        await self.bus.publish_event(JobResult(id=f"{submission(body)}-cancelled", job_id=body.job_name, kind="judge",
                                               ok=False, error=f"cancelled: {reason}"))

    # -- helpers ---------------------------------------------------------------------------------------

    async def _bench(self, body: JudgeJob) -> Bench:
        key = submission(body)
        if key not in self._benches:
            if body.bench_data is not None:
                bench = bench_from_payload(body.bench, body.bench_data.encode())
            elif body.bench_file is not None:
                bench = bench_from_payload(body.bench, await self.bus.get_artifact(body.bench_file))
            else:
                bench = await asyncio.to_thread(load_bench, body.bench)
            self._benches = {**dict(list(self._benches.items())[-15:]), key: bench.subset(body.questions if body.part_of is None else ())}
        return self._benches[key]

    async def _bench_ref(self, body: JudgeJob) -> ArtifactRef | None:
        if body.bench_data is None:
            return body.bench_file
        return await self.bus.put_artifact(JUDGE_BUCKET, f"{keys.PREFIX}/{body.job_name}/bench-{body.id}.json",
                                          body.bench_data.encode())

    def _limiter(self, body: JudgeJob) -> asyncio.Semaphore:
        return self._limiters.setdefault(body.job_name, asyncio.Semaphore(body.parallel))

    def _endpoints(self, body: JudgeJob) -> Endpoints:
        c = self.config
        return Endpoints.open(body.gateway_url or c.gateway_url, body.judge_base_url, gateway_api_key=c.gateway_api_key,
                              judge_api_key=c.judge_api_key, max_retries=c.max_retries, timeout=c.request_timeout)

    async def _done(self, store: RecordStore, question_ids: list) -> set:
        return {qid for qid in question_ids if await store.exists(keys.done_key(qid))}

    async def _progress(self, body: JudgeJob, done: int, total: int, message: str) -> None:
        await self.bus.publish_event(JobProgress(job_id=body.job_name, kind="judge", done=done, total=total,
                                                 message=message))


async def serve(bus: Bus, config: ServiceConfig, stop: asyncio.Event) -> None:
    """Take judge jobs until `stop`; then hand back the parts not finished (another service
    resumes them)."""
    service = JudgeService(bus, config)
    runner = JobRunner(await bus.job_subscription("judge"), JUDGE_JOBS, service.handle,
                       RunnerConfig(capacity=config.capacity, shutdown_grace=config.shutdown_grace),
                       on_failed=service.on_failed, on_dropped=service.on_dropped)
    async with bus.follow_job_events(JobCancel.SUBJECTS) as cancels:
        log.info("judge service %s taking judge jobs (capacity %d)", config.service_id, config.capacity)
        await runner.serve(stop, cancels, service.cancels)
