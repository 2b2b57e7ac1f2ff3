"""Worker memory across a burst: RSS before, at the end of, and after a burst of requests.

    python -m chatfabric.bench.memory --pid WORKER_PID --model NAME [--requests 200]

Runs the burst twice: growth that stays after the second drain, beyond the first, is a leak."""

from __future__ import annotations

import argparse
import asyncio
import json

from ..proto.defaults import DEFAULT_GATEWAY_URL
from .prompts import synthetic
from .runner import Target, run_level


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def burst_and_measure(args) -> dict:
    target = Target(args.base_url, args.model)
    samples = {"before": rss_mib(args.pid)}
    for round_ in (1, 2):
        prompts = synthetic(args.requests, 32, args.output_len, seed=round_)
        row = await run_level(target, prompts, concurrency=args.concurrency, progress=False)
        samples[f"burst{round_}_end"] = rss_mib(args.pid)
        await asyncio.sleep(args.settle)
        samples[f"burst{round_}_drained"] = rss_mib(args.pid)
        samples[f"burst{round_}_completed"] = row["completed"]
    samples["growth_second_burst_mib"] = samples["burst2_drained"] - samples["burst1_drained"]
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--base-url", default=DEFAULT_GATEWAY_URL)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait after each burst")
    print(json.dumps(asyncio.run(burst_and_measure(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
