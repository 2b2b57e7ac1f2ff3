"""The trainer on a real fabric: a train job killed mid-run resumes from its stored checkpoint
on another trainer and ends at the same step; its adapter is published, served by a worker
(`--adapter artifact://NAME`) and answers the trained prompt unlike the base model through the
gateway; a failing job says why; a cancelled job stops within moments, running or not yet
pulled, and leaves nothing on the queue."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto import subjects
from chatfabric.proto.events import JobCancel, JobProgress, JobResult, ModelPublished, TrainJob
from chatfabric.proto.subjects import job_events
from shared_data import SHAREGPT_FILE, shared_file

SHAREGPT = str(shared_file(SHAREGPT_FILE))


def ensure_contract(url):
    async def ensure():
        async with connect(BusConfig.from_env(url=url), "test") as bus:
            await bus.ensure_contract()
    asyncio.run(ensure())


async def submit_and_watch(url, job_of, on_progress=None, timeout=400, before=None):
    async with connect(BusConfig.from_env(url=url), "test") as bus:
        data = "\n".join(json.dumps(r) for r in json.load(open(SHAREGPT))[:2]).encode()
        ref = await bus.put_artifact(subjects.TRAINING_BUCKET, f"train-data/{uuid.uuid4().hex}.jsonl", data)
        job = job_of(ref)
        seen = []
        async with bus.follow_job_events(job_events(job.id), since=job.at - 1) as events:
            if before is not None:
                await before(bus, job)
            await bus.publish_event(job)
            async with asyncio.timeout(timeout):
                while True:
                    event = await events.get()
                    if isinstance(event, JobResult):
                        return event, seen
                    seen.append(event)
                    if on_progress is not None and isinstance(event, JobProgress):
                        on_progress(event)


def test_killed_trainer_resumes_and_the_adapter_is_served(fabric, tmp_path):
    name = f"smol-sft-{uuid.uuid4().hex[:6]}"
    ensure_contract(fabric.nats_url)
    first = fabric._spawn("trainer", ["trainer", "serve", "--work-dir", str(tmp_path / "t1")])
    later = []

    def kill_after_a_checkpoint(progress: JobProgress):
        # step 2's progress is published after step 1's checkpoint was stored
        if progress.done >= 2 and not later:
            first.signal(9)
            later.append(fabric._spawn("trainer", ["trainer", "serve", "--work-dir", str(tmp_path / "t2")]))

    params = {"max_steps": 4, "save_steps": 1, "max_length": 64, "batch_size": 2, "lr": 2e-3}
    result, seen = asyncio.run(submit_and_watch(fabric.nats_url, lambda ref: TrainJob(
        base_model=str(fabric.model_dir), data=ref, output_model=name, method="lora", params=params),
        kill_after_a_checkpoint))
    assert result.ok, result.error
    assert later, "the first trainer finished before it could be killed"
    assert result.summary["steps"] == 4
    messages = [e.message for e in seen if isinstance(e, JobProgress)]
    assert any("delivery 2" in m and "resuming checkpoint-" in m for m in messages), messages
    assert {"loss", "lr", "tokens_per_s", "eta_s"} <= set(next(e.metrics for e in seen if e.done >= 1))

    async def published():
        async with connect(BusConfig.from_env(url=fabric.nats_url), "test") as bus:
            return await bus.last_event(ModelPublished, ModelPublished(
                model=name, artifact=result.artifacts[0], kind="adapter", base_model="x").subject())
    event = asyncio.run(published())
    assert event.artifact == result.artifacts[0] and event.kind == "adapter"

    from openai import OpenAI

    _, base = fabric.gateway()
    fabric.worker(name, "--adapter", f"artifact://{name}", "--max-concurrency", "1")
    fabric.worker(f"{name}-base", "--max-concurrency", "1")
    fabric.wait_workers(base, name, 1, timeout=240)
    fabric.wait_workers(base, f"{name}-base", 1, timeout=240)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    answers = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who are you?"}],
                                              max_tokens=12, temperature=0).choices[0].message.content
               for model in (name, f"{name}-base")]
    assert all(answers) and answers[0] != answers[1], answers  # the trained prompt, answered otherwise


def test_a_running_or_waiting_job_is_cancelled_and_leaves_nothing_queued(fabric, tmp_path):
    ensure_contract(fabric.nats_url)
    trainer = fabric._spawn("trainer", ["trainer", "serve", "--work-dir", str(tmp_path / "t")])
    params = {"max_steps": 500, "save_steps": 1000, "max_length": 64, "batch_size": 2}
    cancelled_at = []

    def cancel_once_training(progress: JobProgress):
        if progress.done >= 1 and not cancelled_at:
            cancelled_at.append(time.monotonic())
            shown = subprocess.run([sys.executable, "-m", "chatfabric.deploy.cli", "train", "cancel", progress.job_id,
                                    "--reason", "wrong data", "--nats-url", fabric.nats_url],
                                   capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0 and f"cancel recorded for train job {progress.job_id}" in shown.stdout, shown

    result, seen = asyncio.run(submit_and_watch(fabric.nats_url, lambda ref: TrainJob(
        base_model=str(fabric.model_dir), data=ref, output_model="never", method="lora", params=params),
        cancel_once_training, timeout=300))
    assert cancelled_at and not result.ok and result.error == "cancelled: wrong data", result
    assert time.monotonic() - cancelled_at[0] < 60
    assert max(e.done for e in seen if isinstance(e, JobProgress)) < 500

    async def cancel_first(bus, job):
        await bus.publish_event(JobCancel(job_id=job.id, kind="train", reason="changed my mind", at=job.at + 1))

    result, seen = asyncio.run(submit_and_watch(fabric.nats_url, lambda ref: TrainJob(
        base_model=str(fabric.model_dir), data=ref, output_model="never", method="lora", params=params),
        timeout=60, before=cancel_first))
    assert not result.ok and result.error == "cancelled: changed my mind", result
    assert not [e for e in seen if isinstance(e, JobProgress)]  # dropped unrun

    async def queue_state():
        async with connect(BusConfig.from_env(url=fabric.nats_url), "test") as bus:
            info = await bus.js.consumer_info(subjects.JOBS_STREAM, subjects.TRAIN_CONSUMER)
            return info.num_pending, info.num_ack_pending
    deadline = time.monotonic() + 30
    while (state := asyncio.run(queue_state())) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state == (0, 0)
    assert trainer.popen.poll() is None  # the service goes on taking jobs


def test_a_failing_job_publishes_why(fabric, tmp_path):
    ensure_contract(fabric.nats_url)
    fabric._spawn("trainer", ["trainer", "serve", "--work-dir", str(tmp_path / "t")])
    result, _ = asyncio.run(submit_and_watch(fabric.nats_url, lambda ref: TrainJob(
        base_model="/no/such/model", data=ref, output_model="never", method="lora"), timeout=120))
    assert not result.ok and "not a folder" in result.error
