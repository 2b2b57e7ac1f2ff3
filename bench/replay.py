"""Replay benchmark: how fast `proto/replay.py` reads a long event stream, and in how much memory.

    python -m chatfabric.bench.replay --messages 1000000 --runs 3

Starts an embedded nats-server (file storage in a temporary folder), ensures the contract, fills ARENA with --messages small votes (about 230 bytes of JSON each),
then replays them --runs times through `replay(bus, Vote)`: every message read, parsed and
validated as a `Vote`. Reported per run: messages per second (wall clock), this process's CPU
time per message (what the rate would be with a core to itself), and its peak resident memory,
whose growth across runs shows that a replay streams rather than accumulates. Each run is
preceded by a baseline on the same machine at the same moment: the client library alone
pulling the same messages in the same batches and doing nothing with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import resource
import statistics
import time

import nats
from nats.js import api

from ..proto.bus import BusConfig, connect
from ..proto.embedded import EmbeddedServer, free_port
from ..proto.events import Vote
from ..proto.replay import replay

FILL_CHUNK = 10_000


def vote(i: int) -> bytes:
    return Vote(id=f"v{i:09d}", winner=("model_a", "model_b", "tie")[i % 3], model_a="model-one",
                model_b="model-two", anonymous=True, conversation_a=f"a{i}", conversation_b=f"b{i}",
                client="c0ffee").model_dump_json().encode()


async def fill(url: str, count: int) -> None:
    """Publish `count` votes without waiting for each acknowledgement: a million confirmed
    publishes would take longer than the replay being measured. A plain connection publishes
    and the stream's message count says when all are stored."""
    nc = await nats.connect(url)
    try:
        subject = Vote(id="x", winner="tie", model_a="a", model_b="b", anonymous=True,
                       conversation_a="a", conversation_b="b").subject()
        for start in range(0, count, FILL_CHUNK):
            for i in range(start, min(start + FILL_CHUNK, count)):
                await nc.publish(subject, vote(i))
            await nc.flush()
        js = nc.jetstream()
        while (await js.stream_info(Vote.STREAM)).state.messages < count:
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def baseline(url: str, count: int, batch: int) -> float:
    """Messages per second of nats-py pulling `count` messages and dropping them: the ceiling
    for any reader in Python on this machine now."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        consumer = await js.add_consumer(Vote.STREAM, config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, mem_storage=True, inactive_threshold=60))
        inbox, done, seen = nc.new_inbox(), asyncio.Event(), 0
        pull = f"$JS.API.CONSUMER.MSG.NEXT.{Vote.STREAM}.{consumer.name}"
        request = json.dumps({"batch": batch, "expires": 5_000_000_000}).encode()

        async def arrived(msg) -> None:
            nonlocal seen
            seen += 1
            if seen % batch == 0:
                await nc.publish(pull, request, reply=inbox)
            if seen == count:
                done.set()

        await nc.subscribe(inbox, cb=arrived)
        started = time.perf_counter()
        await nc.publish(pull, request, reply=inbox)
        await asyncio.wait_for(done.wait(), 600)
        return count / (time.perf_counter() - started)
    finally:
        await nc.close()


async def measure(url: str, count: int, runs: int, batch: int) -> list[float]:
    rates = []
    async with connect(BusConfig(url=url), "bench-replay", role="admin") as bus:
        for run in range(runs):
            ceiling = await baseline(url, count, batch)
            started, cpu = time.perf_counter(), time.process_time()
            read = replay(bus, Vote, batch=batch)
            async for _ in read:
                pass
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            if read.delivered != count or read.invalid:
                raise SystemExit(f"run {run + 1}: read {read.delivered} valid and {read.invalid} invalid votes, "
                                 f"expected {count}")
            rates.append(count / elapsed)
            print(f"run {run + 1}: {count:,} votes in {elapsed:.2f} s = {rates[-1]:,.0f} msg/s "
                  f"({cpu / count * 1e6:.1f} us CPU each: {count / cpu:,.0f} msg/s per CPU second), "
                  f"peak RSS {peak_rss_mib():.0f} MiB; baseline (nats-py alone) {ceiling:,.0f} msg/s", flush=True)
    return rates


async def run(args) -> None:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(EmbeddedServer(port=free_port())).url
        async with connect(BusConfig(url=url), "bench-replay", role="admin"):
            pass  # ensures the contract: ARENA exists
        started = time.perf_counter()
        await fill(url, args.messages)
        print(f"filled ARENA with {args.messages:,} votes in {time.perf_counter() - started:.1f} s; "
              f"peak RSS {peak_rss_mib():.0f} MiB before replaying", flush=True)
        rates = await measure(url, args.messages, args.runs, args.batch)
    print(f"median {statistics.median(rates):,.0f} msg/s over {len(rates)} runs "
          f"(batch {args.batch}; Python {platform.python_version()}, {platform.machine()})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000, help="messages per pull request")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
