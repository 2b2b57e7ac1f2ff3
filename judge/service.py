"""`chatfabric judge serve`: the judge service. Run any number; they share every job.

A submitted job (a `JudgeJob` on `jobs.judge`) is planned by whichever service pulls it: its
questions are stored as the job's plan and it is fanned out into one part per question (a
`JudgeQuestion`, also on `jobs.judge`), which every service pulls as it has room. A part does its question's work
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

from ..proto.bus import Bus
from ..proto.defaults import DEFAULT_GATEWAY_URL
from ..proto.events import ArtifactRef, JudgeJob, JudgeQuestion, JudgeWork
from ..proto.job_service import JobService
from ..proto.jobs import Job, JobSpec
from ..proto.subjects import JUDGE_BUCKET
from . import store as keys
from .bench import Bench, bench_from_payload, load_bench
from .pipeline import Endpoints, Judging, check_references, collect, jsonl, summary_of
from .store import BusStore, RecordStore

log = logging.getLogger(__name__)

JUDGE_JOB_SPEC = JobSpec("judge", JudgeWork, job_id=lambda work: work.id)


@dataclass(frozen=True)
class ServiceConfig:
    gateway_url: str = DEFAULT_GATEWAY_URL
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


def job_of(work: JudgeJob | JudgeQuestion) -> JudgeJob:
    return work.job if isinstance(work, JudgeQuestion) else work


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


class JudgeService(JobService[JudgeJob | JudgeQuestion]):
    kind = "judge"
    spec = JUDGE_JOB_SPEC
    span = "judge.job"

    def __init__(self, bus: Bus, config: ServiceConfig):
        super().__init__(bus, config.capacity, config.shutdown_grace)
        self.config = config
        self._limiters: dict[str, asyncio.Semaphore] = {}
        self._benches: dict[str, Bench] = {}  # by submission

    # -- a job's life ------------------------------------------------------------------------------

    def name(self, body: JudgeJob | JudgeQuestion) -> str:
        return body.job_name

    def submission(self, body: JudgeJob | JudgeQuestion) -> str:
        return job_of(body).id

    def submitted_at(self, body: JudgeJob | JudgeQuestion) -> float:
        return job_of(body).at

    def attributes(self, job: Job[JudgeJob | JudgeQuestion]) -> dict:
        return {"chatfabric.judge_model": job_of(job.body).judge_model,
                "chatfabric.part": isinstance(job.body, JudgeQuestion)}

    def failure(self, job: Job[JudgeJob | JudgeQuestion]) -> str:
        where = f" (question {job.body.question!r})" if isinstance(job.body, JudgeQuestion) else ""
        return f"{type(job.error).__name__}: {job.error}{where}"

    async def run(self, job: Job[JudgeJob | JudgeQuestion]) -> None:
        if isinstance(job.body, JudgeQuestion):
            await self._run_question(job.body)
        else:
            await self._plan(job.body)

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
        await self.progress(body, len(done), len(planned), f"planned {len(planned)} questions")
        if len(done) == len(planned):
            await self._finish(body, bench, store)
            return
        planned_job = body.model_copy(update={"bench_data": None, "bench_file": await self._bench_ref(body)})
        for index, q in enumerate(bench.questions):
            if q.question_id not in done:
                await self.bus.publish_event(JudgeQuestion(id=f"{body.id}-p{index}", job=planned_job,
                                                           question=q.question_id))
        log.info("judge job %s: %d of %d questions to do, fanned out", body.job_name, len(planned) - len(done), len(planned))

    async def _run_question(self, part: JudgeQuestion) -> None:
        body = part.job
        store = BusStore(self.bus, body.job_name)
        plan = await store.get(keys.PLAN_KEY)
        if plan is None:
            raise LookupError(f"job {body.job_name} has no plan: its parts cannot run")
        bench = (await self._bench(body)).subset(plan["questions"])
        question = bench.question(part.question)
        endpoints = self._endpoints(body)
        try:
            judging = Judging(body, bench, store, endpoints, self._limiter(body), by=self.config.service_id)
            await judging.run_question(question)
        finally:
            await endpoints.close()
        done = await self._done(store, plan["questions"])
        await self.progress(body, len(done), len(plan["questions"]), f"question {question.question_id} judged")
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
        await self.result(body, "result", ok=True, artifacts=tuple(refs), summary=flat_summary(summary))

    # -- helpers ---------------------------------------------------------------------------------------

    async def _bench(self, body: JudgeJob) -> Bench:
        key = body.id
        if key not in self._benches:
            if body.bench_data is not None:
                bench = bench_from_payload(body.bench, body.bench_data.encode())
            elif body.bench_file is not None:
                bench = bench_from_payload(body.bench, await self.bus.get_artifact(body.bench_file))
            else:
                bench = await asyncio.to_thread(load_bench, body.bench)
            self._benches = {**dict(list(self._benches.items())[-15:]), key: bench.subset(body.questions)}
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



async def serve(bus: Bus, config: ServiceConfig, stop: asyncio.Event) -> None:
    """Take judge jobs until `stop`; then hand back the parts not finished (another service
    resumes them)."""
    log.info("judge service %s", config.service_id)
    await JudgeService(bus, config).serve(stop)
