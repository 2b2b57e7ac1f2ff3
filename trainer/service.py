"""`chatfabric trainer serve`: take train jobs from JOBS with the job runner, train in a thread,
publish progress, checkpoints, the result and the model on the bus. Run any number.

A train job never calls `job.start()`: while it trains, the runner keeps its delivery alive
(`in_progress`), so a trainer that dies or is stopped leaves the job to the stream, and the
next trainer to take it resumes from the checkpoint this one stored in the artifacts store
(`checkpoints/<job id>.tar`, replaced at every checkpoint). Running a step twice is cheap;
losing a job is not. A job whose result is already published is not trained again (a
redelivery after the work was done): its result is published once more. A job that fails
(bad data, bad settings, an error in training) is terminated and its `JobResult` says why.
A `JobCancel` naming the job (`chatfabric train cancel ID`) stops it within a step, with no
checkpoint, wherever it runs; one that comes before the job is pulled drops it unrun.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..proto.bus import Bus
from ..proto.events import JobResult, TrainJob
from ..proto.job_service import JobService
from ..proto.jobs import Interrupt, Job, JobSpec
from ..proto.subjects import result_subject
from .progress import Hooks, Progress
from .publish import fetch_checkpoint, publish_model, store_checkpoint, write_card
from .settings import TrainSettings
from .sft import RunSpec

log = logging.getLogger(__name__)

TRAIN_JOB_SPEC = JobSpec("train", TrainJob, job_id=lambda job: job.id)
CHECKPOINT_STORE_TIMEOUT = 300.0


@dataclass(frozen=True)
class ServiceConfig:
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "chatfabric-trainer")
    capacity: int = 1
    shutdown_grace: float = 60.0


def resolve_base_model(name: str) -> Path:
    """A model folder on this machine, or the built-in default model by its name."""
    from ..models.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    if name == DEFAULT_MODEL_NAME:
        return ensure_default_model()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"base model {name!r} is not a folder on this trainer's machine")
    return path


class TrainerService(JobService[TrainJob]):
    kind = "train"
    spec = TRAIN_JOB_SPEC
    span = "train.job"

    def __init__(self, bus: Bus, config: ServiceConfig):
        super().__init__(bus, config.capacity, config.shutdown_grace)
        self.config = config

    def attributes(self, job: Job[TrainJob]) -> dict:
        return {"chatfabric.method": job.body.method, "chatfabric.output_model": job.body.output_model}

    async def run(self, job: Job[TrainJob]) -> None:
        body = job.body
        settings = TrainSettings.from_params(body.method, dict(body.params))
        base = await asyncio.to_thread(resolve_base_model, body.base_model)
        work = self.config.work_dir / body.id
        work.mkdir(parents=True, exist_ok=True)
        try:
            spec = await self._spec(body, settings, base, work)
            await self._progress(body, Progress(0, settings.max_steps if settings.max_steps > 0 else 0, 0.0),
                                 f"started on delivery {job.delivery}" + (f", resuming {spec.resume.name}"
                                                                          if spec.resume else ""))
            result = await self._train(job, body, spec)
            card = write_card(result.folder, name=body.output_model, base_model=body.base_model,
                              data=body.data.name, settings=settings, metrics=result.metrics)
            ref = await publish_model(self.bus, result.folder, card, job_id=body.id)
            await self.result(body, "result", ok=True, artifacts=(ref,), summary=_scalars(result.metrics))
            log.info("train job %s done: %s published (%s)", body.id, body.output_model, ref.digest)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _spec(self, body: TrainJob, settings: TrainSettings, base: Path, work: Path) -> RunSpec:
        data = work / "data.json"
        data.write_bytes(await self.bus.get_artifact(body.data))
        eval_data = None
        if body.eval_data is not None:
            eval_data = work / "eval.json"
            eval_data.write_bytes(await self.bus.get_artifact(body.eval_data))
        checkpoints = work / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        resume = await fetch_checkpoint(self.bus, body.id, checkpoints)
        return RunSpec(base, data, work, settings, eval_data=eval_data, resume=resume or False)

    async def _train(self, job: Job[TrainJob], body: TrainJob, spec: RunSpec):
        """The run, in a thread; a cancelled handler asks it to stop (after a checkpoint, unless
        the job itself was cancelled) and waits for it, so nothing trains on after its job was
        handed back."""
        from .dpo import run_dpo
        from .sft import run_sft

        loop = asyncio.get_running_loop()
        hooks = Hooks(
            on_progress=lambda p: self._from_thread(loop, self._progress(body, p)),
            on_checkpoint=lambda folder, step: asyncio.run_coroutine_threadsafe(
                store_checkpoint(self.bus, body.id, folder), loop).result(CHECKPOINT_STORE_TIMEOUT),
        )
        run = run_dpo if spec.settings.method == "dpo" else run_sft
        training = loop.run_in_executor(None, run, spec, hooks)
        try:
            return await asyncio.shield(training)
        except asyncio.CancelledError:
            hooks.save_on_stop = job.interrupt is not Interrupt.CANCEL
            hooks.stop.set()
            await asyncio.wait([training], timeout=self.config.shutdown_grace)
            raise

    def _from_thread(self, loop, coro) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        future.add_done_callback(lambda f: f.exception() and log.warning("progress not published: %s", f.exception()))

    async def _progress(self, body: TrainJob, progress: Progress, message: str | None = None) -> None:
        await self.progress(body, progress.step, progress.total or None, message or progress.line(), progress.metrics())

    async def finished(self, body: TrainJob) -> bool:
        result = await self.bus.last_event(JobResult, result_subject(body.id))
        if result is None or not result.ok:
            return False
        await self.bus.publish_event(result)
        return True



def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


async def serve(bus: Bus, config: ServiceConfig, stop: asyncio.Event) -> None:
    """Take train jobs until `stop`; then stop the running one at a checkpoint and hand it back."""
    log.info("trainer: work in %s", config.work_dir)
    await TrainerService(bus, config).serve(stop)
