"""`chatfabric train sft|dpo|cancel`: train here (a progress bar, checkpoints in --output, the
result published with --publish-as), or `--submit` the run as a train job and follow it, or
cancel a submitted job."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Callable

from ..proto.bus import connect_from_args
from ..proto.events import JobCancel, JobProgress, TrainJob
from ..proto.job_service import submit_and_follow
from ..proto.subjects import TRAINING_BUCKET
from .progress import Hooks, Progress, Stopped
from .settings import TrainSettings

log = logging.getLogger("chatfabric")


def add_args(p: argparse.ArgumentParser, common: Callable[[argparse.ArgumentParser], None]) -> None:
    parsers = p.add_subparsers(dest="train_command", required=True, metavar="SUBCOMMAND")
    sft = parsers.add_parser("sft", help="supervised fine-tuning (full, or LoRA with --lora)",
                             description="Fine-tune on conversations (ShareGPT or OpenAI messages, JSON or JSONL), "
                             "training only the assistant's tokens.")
    _shared(sft)
    sft.add_argument("--data", required=True, help="training conversations (JSON or JSON Lines)")
    sft.add_argument("--eval-data", help="conversations to report the eval loss on")
    sft.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    sft.add_argument("--qlora", action="store_true", help="LoRA on a 4-bit base model (needs a CUDA GPU)")
    common(sft)
    dpo = parsers.add_parser("dpo", help="DPO on preference pairs (a LoRA adapter)",
                             description="Direct Preference Optimization from arena votes or a pairs file.")
    _shared(dpo)
    source = dpo.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="pairs, JSON Lines: {prompt, chosen, rejected}")
    source.add_argument("--from-arena", action="store_true", help="pairs from the votes in ARENA")
    dpo.add_argument("--as-of", type=float, help="--from-arena: votes stored up to this unix time")
    dpo.add_argument("--min-votes", type=int, default=1, help="--from-arena: refuse to train on fewer pairs")
    dpo.add_argument("--include-named", action="store_true", help="--from-arena: named battles too, not only anonymous")
    dpo.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    common(dpo)
    cancel = parsers.add_parser("cancel", help="cancel a submitted train job",
                                description="Stop a train job submitted with --submit, wherever it runs "
                                "(within a step, no checkpoint kept), or drop it before it starts.")
    cancel.add_argument("job_id", help="the id `--submit` printed")
    cancel.add_argument("--reason", default="cancelled by an operator")
    common(cancel)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", required=True, help="the base model folder (or the default model's name)")
    p.add_argument("--output", required=True, help="folder for checkpoints and the result")
    p.add_argument("--max-length", type=int, help="tokens per sample, longer ones are cut (default 2048)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--batch-size", type=int, help="samples per step, packed into one row (default 4)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-target", help="q_proj,v_proj (default) or all-linear")
    p.add_argument("--deepspeed", help="zero2, zero3 or a DeepSpeed config file")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, help="a checkpoint every so many steps (default 50)")
    p.add_argument("--conv-template", help="a built-in chat template instead of the model's own")
    p.add_argument("--merge", action="store_true", help="publish the merged model instead of the adapter")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output")
    p.add_argument("--publish-as", help="publish the result to the artifacts store as this model name")
    p.add_argument("--submit", action="store_true", help="run it as a train job on the fabric and follow it")


def method_of(args) -> str:
    if args.train_command == "dpo":
        return "dpo"
    return "lora" if args.lora or args.qlora else "sft"


def _bus(args):
    return connect_from_args(args, "train", role="trainer")


async def run(args, stop: asyncio.Event) -> None:
    if args.train_command == "cancel":
        await cancel_job(args)
        return
    settings = TrainSettings.from_args(args, method_of(args))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else await _arena_pairs(args, output)
    if args.submit:
        await submit(args, settings, data, stop)
        return
    from .sft import RunSpec

    spec = RunSpec(_base(args.model_path), data, output, settings,
                   eval_data=Path(args.eval_data) if getattr(args, "eval_data", None) else None, resume=args.resume)
    try:
        result = await train_here(spec, stop)
    except Stopped as stopped:
        print(f"{stopped}; the same command with --resume goes on from there", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"saved {result.folder}: " + ", ".join(f"{k} {v}" for k, v in result.metrics.items()))
    if args.publish_as:
        from .publish import publish_model, write_card

        card = write_card(result.folder, name=args.publish_as, base_model=args.model_path, data=str(data),
                          settings=settings, metrics=result.metrics)
        async with _bus(args) as bus:
            ref = await publish_model(bus, result.folder, card)
        print(f"published artifact://{args.publish_as} ({ref.digest}, {ref.size:,} bytes)")


def _base(model_path: str) -> Path:
    from .service import resolve_base_model

    return resolve_base_model(model_path)


async def train_here(spec, stop: asyncio.Event):
    from .dpo import run_dpo
    from .sft import run_sft

    bar = ProgressBar()
    hooks = Hooks(on_progress=bar.update)
    run = run_dpo if spec.settings.method == "dpo" else run_sft
    training = asyncio.get_running_loop().run_in_executor(None, run, spec, hooks)
    watcher = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([training, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not training.done():
            log.warning("stopping at the next step, after a checkpoint (resume with --resume)")
            hooks.stop.set()
        return await training
    finally:
        watcher.cancel()
        bar.close()


async def _arena_pairs(args, output: Path) -> Path:
    from .pairs import read_arena_pairs, write_pairs

    async with _bus(args) as bus:
        pairs = await read_arena_pairs(bus, until=args.as_of, anonymous_only=not args.include_named)
    if len(pairs) < args.min_votes:
        raise ValueError(f"ARENA holds {len(pairs)} usable preference pairs, fewer than --min-votes {args.min_votes}")
    path = write_pairs(pairs, output / "pairs.jsonl")
    print(f"{len(pairs)} preference pairs from ARENA written to {path}")
    return path


async def cancel_job(args) -> None:
    async with _bus(args) as bus:
        await bus.publish_event(JobCancel(job_id=args.job_id, kind="train", reason=args.reason))
    print(f"cancel recorded for train job {args.job_id}")


async def submit(args, settings: TrainSettings, data: Path, stop: asyncio.Event) -> None:
    """Store the data, publish the job, and follow its events to its result. Ctrl-C stops
    following; the job goes on (`chatfabric train cancel ID` stops it)."""
    async with _bus(args) as bus:
        job_id = TrainJob.model_fields["id"].default_factory()
        data_ref = await bus.put_artifact(TRAINING_BUCKET, f"train-data/{job_id}/{data.name}", data.read_bytes())
        eval_ref = None
        if getattr(args, "eval_data", None):
            eval_ref = await bus.put_artifact(TRAINING_BUCKET, f"train-data/{job_id}/eval-{Path(args.eval_data).name}",
                                              Path(args.eval_data).read_bytes())
        job = TrainJob(id=job_id, base_model=args.model_path, data=data_ref, eval_data=eval_ref,
                       output_model=args.publish_as or f"{Path(args.model_path).name}-{settings.method}-{job_id[:8]}",
                       method=settings.method, params=settings.to_params())
        print(f"submitted train job {job.id}: {job.output_model}")
        bar = ProgressBar()
        try:
            result = await submit_and_follow(bus, job, job.id, stop, on_progress=bar.update_event)
        finally:
            bar.close()
        if result is None:
            print(f"stopped following train job {job.id}, which goes on; "
                  f"`chatfabric train cancel {job.id}` stops it")
            return
    if not result.ok:
        raise ValueError(f"train job {job.id} failed: {result.error}")
    ref = result.artifacts[0]
    print(f"published artifact://{job.output_model} ({ref.digest}, {ref.size:,} bytes): "
          + ", ".join(f"{k} {v}" for k, v in result.summary.items()))


class ProgressBar:
    """A terminal progress bar: steps, with loss, learning rate, tokens/s and ETA after it."""

    def __init__(self):
        self._bar = None

    def update(self, progress: Progress) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=progress.total or None, unit="step", dynamic_ncols=True)
        if progress.total and self._bar.total != progress.total:
            self._bar.total = progress.total
        self._bar.n = progress.step
        self._bar.set_postfix_str(progress.line().split(", ", 1)[-1], refresh=True)

    def update_event(self, event: JobProgress) -> None:
        m = event.metrics
        self.update(Progress(event.done, event.total or 0, m.get("epoch", 0.0), m.get("loss"), m.get("lr"),
                             m.get("tokens_per_s", 0.0), eta_s=m.get("eta_s")))

    def close(self) -> None:
        if self._bar is not None:
            with contextlib.suppress(Exception):
                self._bar.close()
