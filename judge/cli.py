"""`chatfabric judge run | serve | show | agreement | cancel`: flags, configuration and the
client side of a judge job (submit, follow with a progress bar, write the results)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from ..proto.auth import add_auth_args
from ..proto.bus import DEFAULT_URL, Bus, connect_from_args
from ..proto.defaults import gateway_url
from ..proto.events import ConversationLog, JobCancel, JobProgress, JudgeJob, Vote
from ..proto.job_service import submit_and_follow
from ..proto.jobs import until_stopped
from ..proto.replay import replay
from .agreement import agreement_table, human_verdicts, judge_verdicts, match_question
from .bench import Bench, bench_file_payload, bench_from_payload, load_bench, packaged_bench_text
from .pipeline import Endpoints, Judging, check_references, collect, first_error, jsonl, summary_of
from .report import write_report
from .results import format_summary, pair_rows, read_judgment_files, summarize, text_table
from .service import ServiceConfig, serve
from .store import DirStore

log = logging.getLogger(__name__)

MODES = ("single", "pairwise-baseline", "pairwise-all")
CLIENT_ROLE = "arena"  # submitting and cancelling judge jobs, reading EVENTS and ARENA: the arena's rights


def add_args(parser: argparse.ArgumentParser, common=None) -> None:
    """The subcommands' flags; `common(subparser)` adds the NATS, credential and log flags
    (without it, they are added here)."""
    sub = parser.add_subparsers(dest="judge_command", required=True, metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="judge models on a question set (as a job, or --local)",
                         description="Generate answers through the gateway, judge them, show the tables.")
    run.add_argument("--bench", default="mt_bench", help="a packaged question set (default: %(default)s)")
    run.add_argument("--bench-file", type=Path, help="a question file in FastChat's format instead of --bench")
    run.add_argument("--reference-file", type=Path, help="reference answers for --bench-file (FastChat's answer format)")
    run.add_argument("--prompts-file", type=Path,
                     help="judge prompts in FastChat's judge_prompts.jsonl shape, each replacing the packaged prompt "
                     "of its name")
    run.add_argument("--questions", help="only these question ids, comma-separated")
    run.add_argument("--models", required=True, help="comma-separated models to judge")
    run.add_argument("--judge-model", required=True)
    run.add_argument("--mode", choices=MODES, default="single")
    run.add_argument("--baseline", help="the baseline model of --mode pairwise-baseline")
    run.add_argument("--gateway-url", default=gateway_url(),
                     help="where the models answer (default: $CHATFABRIC_GATEWAY_URL or %(default)s)")
    run.add_argument("--judge-base-url", help="the judge's OpenAI-compatible endpoint (default: the gateway)")
    run.add_argument("--judge-api-key", default=os.environ.get("CHATFABRIC_JUDGE_API_KEY"),
                     help="with --local (default: $CHATFABRIC_JUDGE_API_KEY); a service uses its own")
    run.add_argument("--api-key", default=os.environ.get("CHATFABRIC_API_KEY"), help="the gateway's API key, with --local")
    run.add_argument("--parallel", type=int, default=8, help="model calls at once (default: %(default)s)")
    run.add_argument("--max-tokens", type=int, default=1024, help="per answer turn (default: %(default)s, FastChat's)")
    run.add_argument("--judge-max-tokens", type=int, default=2048, help="per judgment (default: %(default)s)")
    run.add_argument("--judge-retries", type=int, default=2, help="more judge calls for an unreadable verdict")
    run.add_argument("--seed", type=int, default=0, help="seeds the sampled answers (default: %(default)s)")
    run.add_argument("--name", help="the job's name: a job submitted again under it resumes and redoes nothing "
                                    "(default: derived from the settings)")
    run.add_argument("--output", type=Path, help="where the results go (default: judge-results/NAME)")
    run.add_argument("--local", action="store_true", help="run in this process, without a service or NATS")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    serve_p = sub.add_parser("serve", help="the judge service: take judge jobs from the fabric",
                             description="Consume judge jobs; run any number of these, they share every job.")
    serve_p.add_argument("--gateway-url", default=gateway_url(),
                         help="where the models answer (default: $CHATFABRIC_GATEWAY_URL or %(default)s)")
    serve_p.add_argument("--api-key", default=os.environ.get("CHATFABRIC_API_KEY"), help="the gateway's API key")
    serve_p.add_argument("--judge-api-key", default=os.environ.get("CHATFABRIC_JUDGE_API_KEY"))
    serve_p.add_argument("--capacity", type=int, default=4, help="questions worked on at once (default: %(default)s)")
    serve_p.add_argument("--max-retries", type=int, default=5, help="retries with backoff of 429/5xx/timeouts")
    serve_p.add_argument("--request-timeout", type=float, default=600.0)
    serve_p.add_argument("--shutdown-grace", type=float, default=10.0)
    show = sub.add_parser("show", help="tables from judgment files (ours or FastChat's model_judgment/*.jsonl)")
    show.add_argument("files", nargs="+", type=Path)
    show.add_argument("--mode", choices=MODES, default="single")
    show.add_argument("--baseline", default="gpt-3.5-turbo", help="with pairwise-baseline (default: %(default)s)")
    show.add_argument("--bench", help="a question set, for per-category tables of files without categories")
    show.add_argument("--output", type=Path, help="write summary.json, table.txt and the plots here")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    agree = sub.add_parser("agreement", help="judge against human votes from the ARENA stream")
    agree.add_argument("files", nargs="+", type=Path, help="pairwise judgment files")
    agree.add_argument("--bench", default="mt_bench")
    agree.add_argument("--bench-file", type=Path)
    cancel = sub.add_parser("cancel", help="cancel a judge job by name")
    cancel.add_argument("name")
    cancel.add_argument("--reason", default="cancelled by an operator")
    for p in (run, serve_p, show, agree, cancel):
        (common or _common_args)(p)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL"),
                   help=f"NATS server to join (default: $NATS_URL, else {DEFAULT_URL})")
    p.add_argument("--log-level", default=os.environ.get("CHATFABRIC_LOG_LEVEL", "INFO"))
    add_auth_args(p)


async def run(args, stop: asyncio.Event) -> None:
    command = {"run": run_job, "serve": run_service, "show": show_results, "agreement": show_agreement,
               "cancel": cancel_job}[args.judge_command]
    await command(args, stop)


# -- serve ------------------------------------------------------------------------------------------


async def run_service(args, stop: asyncio.Event) -> None:
    config = ServiceConfig(gateway_url=args.gateway_url, gateway_api_key=args.api_key, judge_api_key=args.judge_api_key,
                           capacity=args.capacity, max_retries=args.max_retries, request_timeout=args.request_timeout,
                           shutdown_grace=args.shutdown_grace)
    async with connect_from_args(args, "judge", stop, role="judge") as bus:
        await serve(bus, config, stop)


# -- run --------------------------------------------------------------------------------------------


def _bench_of(args) -> tuple[Bench, str | None]:
    """The bench, and the payload to send inline (None: a packaged bench, unchanged)."""
    if args.bench_file is None and args.prompts_file is None:
        return load_bench(args.bench), None
    if args.bench_file is None:
        (questions, refs), name = packaged_bench_text(args.bench), args.bench
    else:
        questions = args.bench_file.read_text(encoding="utf-8")
        refs = args.reference_file.read_text(encoding="utf-8") if args.reference_file else None
        name = re.sub(r"[^A-Za-z0-9_-]", "_", args.bench_file.stem)[:64] or "bench"
    prompts = args.prompts_file.read_text(encoding="utf-8") if args.prompts_file else None
    payload = bench_file_payload(questions, refs, prompts)
    return bench_from_payload(name, payload), payload.decode()


def _question_ids(text: str | None) -> tuple:
    if not text:
        return ()
    return tuple(int(q) if q.strip().isdigit() else q.strip() for q in text.split(",") if q.strip())


def build_job(args, bench: Bench, bench_data: str | None) -> JudgeJob:
    """The job the flags describe; its default name is a digest of every setting that changes
    the results, so the same command resumes the same job."""
    fields = dict(bench=bench.name, models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                  judge_model=args.judge_model, mode=args.mode, baseline=args.baseline if args.mode == "pairwise-baseline" else None,
                  questions=_question_ids(args.questions), judge_base_url=args.judge_base_url,
                  max_tokens=args.max_tokens, judge_max_tokens=args.judge_max_tokens, parallel=args.parallel,
                  judge_retries=args.judge_retries, seed=args.seed)
    job = JudgeJob(**fields, bench_data=bench_data, gateway_url=args.gateway_url if args.gateway_url else None)
    bench.subset(job.questions)  # unknown question ids: an error now, not on the service
    name = args.name or _default_name(fields, bench_data)
    return job.model_copy(update={"name": name})


def _default_name(fields: dict, bench_data: str | None) -> str:
    settings = {k: v for k, v in fields.items() if k != "parallel"}
    settings["bench_data"] = hashlib.sha256((bench_data or "").encode()).hexdigest()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]
    return f"{fields['bench']}-{fields['mode']}-{digest}"[:96].replace(".", "_")


async def run_job(args, stop: asyncio.Event) -> None:
    bench, bench_data = await asyncio.to_thread(_bench_of, args)
    job = build_job(args, bench, bench_data)
    folder = args.output or Path("judge-results") / job.job_name
    if args.local:
        summary = await run_local(job, bench.subset(job.questions), folder, args, stop)
    else:
        summary = await submit(job, folder, args, stop)
    if summary is not None:
        print(format_summary(summary))
        print(f"\nResults: {folder}/ (summary.json, judgments.jsonl, answers.jsonl, table.txt, categories.png, report.html)")


async def run_local(job: JudgeJob, bench: Bench, folder: Path, args, stop: asyncio.Event) -> dict | None:
    """The whole job in this process; its records live in FOLDER/records, so running the same
    command again resumes it."""
    check_references(bench)
    store = DirStore(folder / "records")
    endpoints = Endpoints.open(args.gateway_url, args.judge_base_url, gateway_api_key=args.api_key,
                               judge_api_key=args.judge_api_key, max_retries=5, timeout=600.0)
    judging = Judging(job, bench, store, endpoints, asyncio.Semaphore(job.parallel), by="local")
    bar = _bar(args, len(bench.questions), job.job_name)

    async def work() -> None:
        async with asyncio.TaskGroup() as tg:
            for q in bench.questions:
                tg.create_task(_one(judging, q, bar))

    try:
        if not await until_stopped(work(), stop):
            print(f"stopped; run the same command again to resume {job.job_name}", file=sys.stderr)
            return None
        answers, judgments = await collect(job, bench, store)
    except ExceptionGroup as group:
        print(f"judge job {job.job_name} failed: {first_error(group)}; run the same command again to resume it",
              file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        bar.close()
        await endpoints.close()
    summary = summary_of(job, bench, judgments)
    await asyncio.to_thread(write_report, folder, summary, jsonl(answers), jsonl(judgments))
    return summary


async def _one(judging: Judging, question, bar) -> None:
    await judging.run_question(question)
    bar.update(1)


def _bar(args, total: int | None, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="question", disable=args.no_progress, file=sys.stderr)


async def submit(job: JudgeJob, folder: Path, args, stop: asyncio.Event) -> dict | None:
    """Submit the job, show its progress, and on its result fetch and write its files. Ctrl-C
    stops following; the job goes on (`chatfabric judge cancel NAME` cancels it)."""
    async with connect_from_args(args, "judge-run", stop, role=CLIENT_ROLE) as bus:
        bar = _bar(args, None, job.job_name)
        try:
            result = await submit_and_follow(bus, job, job.job_name, stop, on_progress=lambda e: _show(bar, e),
                                             on_cancel=lambda e: print(f"the job was cancelled: {e.reason}",
                                                                       file=sys.stderr))
        finally:
            bar.close()
        if result is None:
            print(f"stopped following judge job {job.job_name}, which goes on; "
                  f"`chatfabric judge cancel {job.job_name}` cancels it", file=sys.stderr)
            return None
        if not result.ok:
            print(f"judge job {job.job_name} failed: {result.error}", file=sys.stderr)
            raise SystemExit(1)
        files = {ref.name.rsplit("/", 1)[-1]: await bus.get_artifact(ref) for ref in result.artifacts}
    summary = json.loads(files["summary.json"])
    await asyncio.to_thread(write_report, folder, summary, files.get("answers.jsonl"), files.get("judgments.jsonl"))
    return summary


def _show(bar, event: JobProgress) -> None:
    bar.total = event.total
    bar.n = event.done
    bar.set_postfix_str(event.message[:60])
    bar.refresh()


# -- show, agreement, cancel ----------------------------------------------------------------------------------


async def show_results(args, stop: asyncio.Event) -> None:
    categories = None
    if args.bench:
        bench = await asyncio.to_thread(load_bench, args.bench)
        categories = {q.question_id: q.category for q in bench.questions}
    records = await asyncio.to_thread(read_judgment_files, args.files, categories)
    summary = summarize(records, args.mode, args.baseline)
    if args.output:
        await asyncio.to_thread(write_report, args.output, summary)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))


async def show_agreement(args, stop: asyncio.Event) -> None:
    bench = (await asyncio.to_thread(load_bench, args.bench) if args.bench_file is None else
             bench_from_payload(args.bench, bench_file_payload(args.bench_file.read_text(), None)))
    judge = judge_verdicts(pair_rows(await asyncio.to_thread(read_judgment_files, args.files)))
    async with connect_from_args(args, "judge-agreement", stop, role=CLIENT_ROLE) as bus:
        votes = await arena_votes(bus, bench)
    rows = agreement_table(judge, human_verdicts(votes))
    print(f"{len(votes)} arena votes on {bench.name} questions")
    print(text_table(["turn", "ties", "total", "agree", "ratio"],
                     [[str(r["turn"]), r["ties"], str(r["total"]), str(r["agree"]),
                       "-" if r["ratio"] is None else f"{r['ratio']:.2f}"] for r in rows]))


async def arena_votes(bus: Bus, bench: Bench) -> list[tuple]:
    """(question id, turn, model_a, model_b, winner) of every vote whose conversations asked a
    bench question."""
    asked = {}
    async for item in replay(bus, ConversationLog):
        users = [m.content for m in item.message.messages if m.role == "user"]
        if users:
            found = match_question(users[0], len(users), bench.questions)
            if found:
                asked[item.message.id] = found
    votes = []
    async for item in replay(bus, Vote):
        vote = item.message
        found = asked.get(vote.conversation_a)
        if found and asked.get(vote.conversation_b) == found:
            votes.append((*found, vote.model_a, vote.model_b, vote.winner))
    return votes


async def cancel_job(args, stop: asyncio.Event) -> None:
    async with connect_from_args(args, "judge-cancel", stop, role=CLIENT_ROLE) as bus:
        await bus.publish_event(JobCancel(job_id=args.name, kind="judge", reason=args.reason))
    print(f"cancel recorded for {args.name}")
