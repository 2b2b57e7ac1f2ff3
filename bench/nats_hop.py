"""What one hop through nats-server costs in latency, after the sender was idle for a while.

The fabric's first token at concurrency 1 crosses nats-server at least twice (the request to the
worker, its first chunk back to the gateway) plus the JetStream publish's acknowledgement, each
after the processes involved had nothing to do. This measures those hops alone, with nothing of
chatfabric on them: one client on the process's event loop (uvloop, as on the bus), an embedded
`nats-server`, and for each idle gap

- `core`: a core NATS publish until the client's own subscription receives it;
- `jetstream`: a JetStream publish (memory storage) until its acknowledgement arrives;

each message sent `--gap-ms` after the previous one arrived:

    python -m chatfabric.bench.nats_hop --gaps-ms 0,0.5,2,10 --output docs/results/hop.jsonl

A gap of 0 sends back to back, so that nats-server and the client never go idle; longer gaps
show what waking an idle process costs on the host."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import tempfile
import time
from pathlib import Path

import nats

from ..deploy.cli import event_loop_factory
from ..proto.embedded import EmbeddedServer
from .metrics import distribution


def summary(kind: str, gap_ms: float, samples_ms: list[float]) -> dict:
    spread = distribution(samples_ms, scale=1.0)
    return {"kind": kind, "gap_ms": gap_ms, "n": len(samples_ms),
            "p50_ms": spread["p50"], "p90_ms": spread["p90"], "mean_ms": spread["mean"]}


async def hops(url: str, gaps_ms: list[float], count: int) -> list[dict]:
    nc = await nats.connect(url)
    try:
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def heard(_msg) -> None:
            arrived.put_nowait(time.perf_counter())

        await nc.subscribe("hop.core", cb=heard)
        js = nc.jetstream()
        await js.add_stream(name="HOP", subjects=["hop.js"], storage="memory", max_msgs=1000)
        rows = []
        for gap_ms in gaps_ms:
            core, stored = [], []
            for _ in range(count):
                await asyncio.sleep(gap_ms / 1000)
                sent = time.perf_counter()
                await nc.publish("hop.core", b"x")
                core.append((await arrived.get() - sent) * 1000)
            for _ in range(count):
                await asyncio.sleep(gap_ms / 1000)
                sent = time.perf_counter()
                await js.publish("hop.js", b"x")
                stored.append((time.perf_counter() - sent) * 1000)
            rows += [summary("core", gap_ms, core), summary("jetstream", gap_ms, stored)]
        return rows
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaps-ms", default="0,0.5,2,10", help="idle gaps before each message, comma-separated")
    parser.add_argument("--count", type=int, default=400, help="messages per gap and kind")
    parser.add_argument("--output", type=Path, help="append one JSON line per gap and kind to this file")
    args = parser.parse_args()
    gaps = [float(g) for g in args.gaps_ms.split(",")]
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as store, EmbeddedServer(store_dir=Path(store)) as server:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            rows = runner.run(hops(server.url, gaps, args.count))
    for row in rows:
        row["when"] = when
        print(f"{row['kind']:>9} gap {row['gap_ms']:>4g} ms: p50 {row['p50_ms']:.3f} ms, "
              f"p90 {row['p90_ms']:.3f} ms ({row['n']} messages)")
        if args.output:
            with args.output.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
