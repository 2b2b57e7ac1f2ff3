"""Leaderboard benchmark: the whole of `chatfabric leaderboard` on a stream of a million votes.

    python -m chatfabric.bench.leaderboard [--battles 1000000] [--models 50] [--rounds 100] [--runs 3]

Starts an embedded nats-server (file storage in a temporary folder), fills ARENA with the
seeded synthetic log of `bench/arena_ratings.py` (1,000,000 battles among 50 models, 5% not
anonymous) as `Vote` events, then per run: replays the anonymous votes (`feed.read_arena`),
builds the battles table, and computes the results (`results.compute_results`: online Elo,
Bradley-Terry, its bootstrap, the matrices), timing each step, with this process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import statistics
import time

import nats

from ..arena import ratings
from ..arena.feed import read_arena
from ..arena.results import rated_battles
from ..arena.table import WINNERS
from ..proto.bus import BusConfig, connect
from ..proto.embedded import EmbeddedServer, free_port
from ..proto.events import Vote
from .arena_ratings import synthetic_battles

FILL_CHUNK = 10_000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def fill(url: str, battles: int, models: int, seed: int) -> None:
    """Publish the log as votes without waiting for each acknowledgement (a million confirmed
    publishes would take longer than what is measured); the stream's count says when all are in."""
    table, _ = synthetic_battles(battles, models, seed)
    nc = await nats.connect(url)
    try:
        for start in range(0, battles, FILL_CHUNK):
            for i in range(start, min(start + FILL_CHUNK, battles)):
                vote = Vote(id=f"v{i:09d}", at=float(table.tstamp[i]), winner=WINNERS[table.winner[i]],
                            model_a=table.models[table.model_a[i]], model_b=table.models[table.model_b[i]],
                            anonymous=bool(table.anony[i]), conversation_a=f"a{i}", conversation_b=f"b{i}")
                await nc.publish(vote.subject(), vote.model_dump_json().encode())
            await nc.flush()
        js = nc.jetstream()
        while (await js.stream_info(Vote.STREAM)).state.messages < battles:
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


def timed(times: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    times[name] = time.perf_counter() - start
    return value


async def one_run(bus, rounds: int) -> dict:
    times: dict = {}
    start = time.perf_counter()
    tally = await read_arena(bus)
    times["replay"] = time.perf_counter() - start
    table = timed(times, "table", tally.columns.battles, tally.style)
    table = timed(times, "filter_sort", rated_battles, table)
    timed(times, "elo", ratings.elo_ratings, table)
    timed(times, "bt", ratings.bt_ratings, table)
    timed(times, "bootstrap_bt", ratings.bootstrap_bt, table, rounds, 0)
    times["replay_elo_bt"] = sum(times[k] for k in ("replay", "table", "filter_sort", "elo", "bt"))
    return {"battles": len(table), "last_seq": tally.last_seq,
            **{k: round(v, 2) for k, v in times.items()}, "peak_rss_mib": round(peak_rss_mib())}


async def run(args) -> None:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(EmbeddedServer(port=free_port())).url
        async with connect(BusConfig(url=url), "bench-leaderboard", role="admin"):
            pass  # ensures the contract
        started = time.perf_counter()
        await fill(url, args.battles, args.models, args.seed)
        print(f"filled ARENA with {args.battles:,} votes in {time.perf_counter() - started:.0f} s; "
              f"peak RSS {peak_rss_mib():.0f} MiB so far", flush=True)
        runs = []
        async with connect(BusConfig(url=url), "bench-leaderboard", role="admin") as bus:
            for number in range(args.runs):
                runs.append(await one_run(bus, args.rounds))
                print(json.dumps({"run": number + 1, **runs[-1]}), flush=True)
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key not in ("battles", "last_seq")}
    print(json.dumps({"median": medians, "runs": len(runs), "load_avg": os.getloadavg(),
                      "python": platform.python_version(), "cpus": os.cpu_count()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--battles", type=int, default=1_000_000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
