"""The `chatfabric` command. Each component owns its flags, configuration and run (`add_args`,
`run` in `gateway/cli.py`, `worker/cli.py`, `deploy/up.py`, `bench/cli.py`); this module only
composes them into subcommands, sets up logging and turns signals into a stop event.

Only the chosen command's component is imported (`chatfabric --help` imports none), so each
component installs and runs with its own extra alone; a module that an extra brings and this
installation lacks is reported as the `pip install "chatfabric[...]"` to run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

from ..proto.auth import add_auth_args
from ..proto.bus import DEFAULT_URL, BusLost
from ..proto.embedded import terminate_all
from .extras import extra_for, install_hint

log = logging.getLogger("chatfabric")


@dataclass(frozen=True)
class Command:
    """A subcommand: where its flags and its run come from (imported when it is used)."""

    name: str
    help: str
    description: str
    module: str  # relative to the chatfabric package, holding add_args(parser) and run(args, stop)
    extra: str | None  # the extra it is installed with (None: the core dependencies suffice)
    joins_bus: bool = True
    # a command with subcommands: add_args(parser, common) adds the common flags to each of them
    subcommands: bool = False


COMMANDS = (
    Command("up", "run NATS, a gateway and a worker on this machine",
            "Start everything on one machine: an embedded NATS server (unless --nats-url or $NATS_URL "
            "names one), the OpenAI-compatible gateway, and one worker.", "deploy.up", "hf"),
    Command("gateway", "run an OpenAI-compatible gateway",
            "Serve the OpenAI REST API, backed by the workers on the fabric.", "gateway.cli", None),
    Command("worker", "serve a model to the fabric",
            "Pull requests for one model from the fabric and generate.", "worker.cli", "hf"),
    Command("bench", "benchmark an OpenAI-compatible endpoint",
            "Measure TTFT, TPOT, inter-token latency, end-to-end latency and throughput of any "
            "OpenAI-compatible server (chatfabric, vLLM, FastChat).", "bench.cli", None, joins_bus=False),
    Command("leaderboard", "rate the models from the arena's votes",
            "The arena leaderboard (Bradley-Terry with bootstrap intervals, online Elo, style control) from a "
            "replay of the ARENA stream, as of any time, or from a FastChat clean-battle file; --follow keeps "
            "it current and publishes snapshots.", "arena.leaderboard_cli", "arena"),
    Command("arena", "the arena: web UI, import and export of votes",
            "The Chatbot Arena on the fabric: `serve` the web UI, `import` a FastChat clean-battle file into "
            "ARENA, `export` ARENA's votes in that format.", "arena.cli", "arena", subcommands=True),
    Command("judge", "MT-bench style LLM-as-a-judge: run, serve, show, agreement, cancel",
            "Judge models' answers with an LLM judge (FastChat's MT-bench method), as jobs on the fabric "
            "shared by any number of judge services, or --local.", "judge.cli", "judge", subcommands=True),
    Command("train", "fine-tune a model: sft (full or LoRA), dpo; here or --submit as a job", "Fine-tune on conversations (SFT, LoRA) or preference pairs (DPO, from arena votes or a file), here or as a train job on the fabric; --publish-as makes the result servable as artifact://NAME.", "trainer.cli", "train", subcommands=True),
    Command("data", "training data tools: check, clean, split, stats, from-arena, masks", "Check, clean, split and measure training conversations as the trainer reads them, export conversations or preference pairs from ARENA, and show what the trainer trains on (masks).", "trainer.data_cli", "train", subcommands=True),
    Command("trainer", "the trainer service: serve train jobs", "Take train jobs from the fabric, train, publish progress, checkpoints and models.", "trainer.serve_cli", "train", subcommands=True),
)


def component(command: Command):
    import importlib

    return importlib.import_module(f"..{command.module}", __package__)


def add_common_args(p: argparse.ArgumentParser, command: Command) -> None:
    if not command.joins_bus:
        p.add_argument("--log-level", default="WARNING")
        return
    embedded = command.name == "up"
    help_url = ("NATS server to join (default: $NATS_URL; with neither, an embedded server is started)" if embedded
                else f"NATS server to join (default: $NATS_URL, else {DEFAULT_URL})")
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL"), help=help_url)
    p.add_argument("--log-level", default=os.environ.get("CHATFABRIC_LOG_LEVEL", "INFO"), help="(default: %(default)s)")
    p.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("CHATFABRIC_LOG_FORMAT", "text"),
                   help="json: one JSON object per line, for log collectors (default: $CHATFABRIC_LOG_FORMAT, else text)")
    p.add_argument("--tracing", default=os.environ.get("CHATFABRIC_TRACING"), metavar="otlp|console|file:PATH",
                   help="OpenTelemetry traces: otlp (configured by the standard OTEL_* variables), console, or "
                   "file:PATH (default: $CHATFABRIC_TRACING; off)")
    add_auth_args(p)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the flags of that command alone (the others are
    listed by name, and their components are not imported)."""
    parser = argparse.ArgumentParser(
        prog="chatfabric", description="Serve, evaluate and train LLM chatbots on a NATS JetStream fabric."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        if only is not None and command.name != only:
            continue
        if command.subcommands:
            component(command).add_args(p, lambda subparser, c=command: add_common_args(subparser, c))
        else:
            component(command).add_args(p)
            add_common_args(p, command)
    return parser


SHUTDOWN_MARGIN = 15.0  # seconds beyond the configured grace before a stuck shutdown is cut short


async def _main(args) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    grace = max(getattr(args, "shutdown_grace", 0.0), getattr(args, "drain_timeout", 0.0)) + SHUTDOWN_MARGIN

    def on_signal(sig: int) -> None:
        if stop.is_set():  # a second Ctrl-C or SIGTERM: the user does not want to wait
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            terminate_all()
            os._exit(128 + sig)
        log.info("%s: shutting down", signal.Signals(sig).name)
        stop.set()
        _exit_after(grace)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await component(_command(args.command)).run(args, stop)


def _exit_after(seconds: float) -> None:
    """Whatever hangs during shutdown (a broken connection, a stuck handler), the process is gone
    within `seconds` of the signal."""
    def cut_short() -> None:
        log.error("shutdown did not finish within %.0fs; exiting", seconds)
        terminate_all()
        os._exit(1)

    timer = threading.Timer(seconds, cut_short)
    timer.daemon = True
    timer.start()


def _command(name: str) -> Command | None:
    return next((c for c in COMMANDS if c.name == name), None)


def chosen_command(argv: list[str]) -> str:
    """The command named on the command line ('' when none is: `chatfabric --help`)."""
    return next((word for word in argv if not word.startswith("-")), "")


def missing_extra(err: ModuleNotFoundError, command: Command | None) -> str | None:
    """What to tell a user whose installation lacks a module an extra brings; None for any
    other missing module (a bug, left to its traceback)."""
    if not err.name or err.name.startswith("chatfabric"):
        return None
    extra = extra_for(err.name, command.extra if command else None)
    if extra is None:
        return None
    what = f"chatfabric {command.name}" if command else "chatfabric"
    return f"{what} needs the {extra!r} extra, which is not installed (no module {err.name!r}): {install_hint(extra)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = chosen_command(argv)
    command = _command(name)
    try:
        args = build_parser(only=name).parse_args(argv)
        return _run(args, _command(args.command))
    except ModuleNotFoundError as err:
        message = missing_extra(err, command)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def setup_logging(args) -> None:
    """Our own loggers at --log-level; other libraries' at WARNING (their per-request INFO
    lines would bury a command's own output) unless --log-level is debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if getattr(args, "log_format", "text") == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.getLevelName(args.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"--log-level: unknown level {args.log_level!r} (debug, info, warning, error)")
    logging.basicConfig(level=logging.DEBUG if level <= logging.DEBUG else logging.WARNING,
                        handlers=[handler], force=True)
    logging.getLogger("chatfabric").setLevel(level)
    if level > logging.DEBUG:
        logging.getLogger("transformers").setLevel(logging.ERROR)


LOOPS = ("uvloop", "asyncio")


def event_loop_factory():
    """The event loop of a process on the bus: uvloop (a dependency where it builds: about a
    tenth less CPU per streamed token, docs/performance.md) or, with CHATFABRIC_LOOP=asyncio,
    the standard library's. Unset, it is uvloop where installed and the standard loop elsewhere."""
    asked = os.environ.get("CHATFABRIC_LOOP", "")
    if asked and asked not in LOOPS:
        raise ValueError(f"CHATFABRIC_LOOP={asked!r}: give one of {', '.join(LOOPS)}")
    if asked == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if asked:
            raise ValueError("CHATFABRIC_LOOP=uvloop, but uvloop is not installed (pip install uvloop)") from None
        log.debug("uvloop is not installed: the standard event loop")
        return None
    return uvloop.new_event_loop


def _run(args, command: Command) -> int:
    if not command.joins_bus:  # a client of the fabric, not a process on it: its own synchronous main
        try:
            return component(command).main(args)
        except ValueError as err:
            print(f"chatfabric {command.name}: error: {err}", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        setup_logging(args)
        from ..proto import tracing

        tracing.setup(f"chatfabric-{command.name}", getattr(args, "tracing", None))
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(_main(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"chatfabric {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BusLost as err:
        print(f"chatfabric {args.command}: {err}; exiting so that a supervisor restarts it", file=sys.stderr)
        return 1
    except (ConnectionError, OSError) as err:
        log.debug("cannot start", exc_info=True)
        print(f"chatfabric {args.command}: cannot start: {err}", file=sys.stderr)
        return 1
    finally:
        from ..proto import tracing

        tracing.shutdown()
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the record's structured
    fields (a request's id, model, status, tokens, TTFT and duration) and any traceback."""

    FIELDS = ("request_id", "model", "status", "prompt_tokens", "completion_tokens", "ttft", "duration")

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {"time": round(record.created, 6), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


if __name__ == "__main__":
    sys.exit(main())
