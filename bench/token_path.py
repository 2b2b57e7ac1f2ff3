"""The token path's own cost: CPU seconds of the fabric's processes per streamed token.

Starts `chatfabric up --backend synthetic --no-arena` (gateway, worker with no model and its
embedded nats-server, all counted) for each scenario, warms it up, then streams completions
through it with the bench client (`chatfabric bench`'s runner, in this process, not counted)
and reads the CPU time of `up` and its children from `/proc` before and after:

    python -m chatfabric.bench.token_path --output docs/results/tokens.jsonl

Scenarios (`--only` picks some by name):
- `free-16`, `free-256`: a free-running synthetic worker (each stream yields its next token as
  soon as the loop lets it), concurrency 16 and 256, 256 tokens per request;
- `stepped-128`: `--synthetic-step-ms 10`, every running stream advances one token per 10 ms
  step, all together, as a batched decode does: concurrency 128 offers 12,800 tokens/s;
- `ttft-1`: 16-token completions at concurrency 1, against the same test on a direct aiohttp
  server that streams from its handler (`bench/direct.py`): the TTFT the fabric adds.

`--chatfabric CMD` runs another build (for a before/after, e.g. a checkout's own venv)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ..proto.embedded import free_port
from .prompts import synthetic
from .runner import Target, run_level

MODEL = "SmolLM2-135M-Instruct"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    requests: int
    output_len: int = 256
    worker: tuple[str, ...] = ()  # extra flags for `up`'s worker
    direct_baseline: bool = False


SCENARIOS = (
    Scenario("free-16", 16, 128),
    Scenario("free-256", 256, 512),
    Scenario("stepped-128", 128, 256, worker=("--synthetic-step-ms", "10")),
    Scenario("ttft-1", 1, 300, output_len=16, direct_baseline=True),
)


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """User + system CPU seconds of `root` and every live descendant (from /proc/<pid>/stat),
    by command name."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
        names[pid] = stat[stat.index("(") + 1:stat.rindex(")")]
    seconds: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in ticks:
            seconds[names[pid]] = seconds.get(names[pid], 0.0) + ticks[pid] / TICKS
        todo.extend(children.get(pid, ()))
    return seconds


@dataclass
class Server:
    """A server process of one scenario, on its own port, stopped with SIGINT."""


    argv: list[str]
    port: int
    log: Path
    ready_text: str  # what its /v1/models answer holds once it serves (any answer: "")
    start_timeout: float = 60.0  # seconds it may take to serve
    proc: subprocess.Popen | None = field(default=None, init=False)

    async def __aenter__(self) -> "Server":
        self.proc = subprocess.Popen(self.argv, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        url = f"http://127.0.0.1:{self.port}/v1/models"
        async with aiohttp.ClientSession() as session:
            for _ in range(int(self.start_timeout * 10)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as resp:
                        if self.ready_text in await resp.text():
                            return self
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.argv} did not answer on {url}")

    async def __aexit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def measure(server: Server, scenario: Scenario, model: str) -> dict:
    prompts = synthetic(scenario.requests + scenario.concurrency, 8, scenario.output_len, seed=0)
    warm, measured = prompts[: scenario.concurrency], prompts[scenario.concurrency:]
    target = Target(f"http://127.0.0.1:{server.port}/v1", model, "completions", None, 0.0, True, None)
    # the warm-up runs on its own first, so that the CPU counted is the measured level's only
    await run_level(target, warm, concurrency=scenario.concurrency, progress=False)
    before = tree_cpu_seconds(server.proc.pid)
    row = await run_level(target, measured, concurrency=scenario.concurrency, progress=False)
    after = tree_cpu_seconds(server.proc.pid)
    by_process = {name: after[name] - before.get(name, 0.0) for name in after}
    cpu = sum(by_process.values())
    tokens = row["output_tokens"]
    row.update(server_cpu_s=cpu, server_cpu_by_process=by_process,
               us_per_token=cpu / tokens * 1e6 if tokens else None)
    return row


async def run(args) -> list[dict]:
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="chatfabric-tokens-") as tmp:
        for scenario in chosen:
            for kind in (("direct", "chatfabric") if scenario.direct_baseline else ("chatfabric",)):
                port = free_port()
                ready = "" if kind == "direct" else MODEL
                if kind == "direct":
                    argv = [sys.executable, "-m", "chatfabric.bench.direct", "--port", str(port)]
                else:
                    argv = [*shlex.split(args.chatfabric), "up", "--backend", "synthetic", "--no-arena",
                            "--port", str(port), "--nats-port", str(free_port()),
                            "--max-concurrency", str(max(scenario.concurrency, 16)),
                            "--data-dir", str(Path(tmp) / f"{scenario.name}-{kind}"),
                            *(_per_stream(scenario.worker) if args.no_steps else scenario.worker),
                            *shlex.split(args.flags)]
                async with Server(argv, port, Path(tmp) / f"{scenario.name}-{kind}.log", ready) as server:
                    row = await measure(server, scenario, "direct" if kind == "direct" else MODEL)
                row.update(label=args.label, scenario=scenario.name, server=kind, output_len=scenario.output_len,
                           flags=argv[argv.index("up") + 1:] if kind == "chatfabric" else [],
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                rows.append(row)
                print(line(row), flush=True)
                if args.output:
                    with open(args.output, "a") as out:
                        out.write(json.dumps(row) + "\n")
    return rows


def _per_stream(flags: tuple[str, ...]) -> tuple[str, ...]:
    """`--synthetic-step-ms N` as the older per-stream sleep of N ms per token."""
    if "--synthetic-step-ms" not in flags:
        return flags
    i = flags.index("--synthetic-step-ms")
    return (*flags[:i], "--synthetic-delay", str(float(flags[i + 1]) / 1000), *flags[i + 2:])


def line(row: dict) -> str:
    ttft, itl = row["ttft_ms"], row["itl_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"{row['label'] or '-'} {row['scenario']} {row['server']}: c={row['concurrency']} "
            f"{row['completed']}/{row['requests']} ok, {row['output_throughput']:.0f} tok/s, "
            f"{fmt(row['us_per_token'])} us CPU/token ({row['server_cpu_s']:.2f} s: "
            + ", ".join(f"{name} {s:.2f}" for name, s in row["server_cpu_by_process"].items()) + "), "
            f"TTFT p50 {fmt(ttft['p50'])} ms, ITL p50 {fmt(itl['p50'])} p99 {fmt(itl['p99'])} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SCENARIOS], help="scenarios to run")
    parser.add_argument("--chatfabric", default=f"{sys.executable} -m chatfabric.deploy.cli",
                        help="the command that runs chatfabric (default: this Python's)")
    parser.add_argument("--flags", default="", help="more flags for every `chatfabric up`, e.g. "
                        "'--stream-interval-ms 20'")
    parser.add_argument("--no-steps", action="store_true",
                        help="for a build without --synthetic-step-ms: in stepped-128 each stream sleeps 10 ms "
                        "per token on its own (--synthetic-delay 0.01) instead")
    parser.add_argument("--label", default="", help="a name for this build in the output")
    parser.add_argument("--output", type=Path, help="append one JSON line per scenario to this file")
    args = parser.parse_args()
    start = time.time()
    asyncio.run(run(args))
    print(f"{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
