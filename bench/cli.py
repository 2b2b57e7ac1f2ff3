"""`chatfabric bench`: arguments and the sweep over load levels."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
from pathlib import Path

from ..proto.defaults import DEFAULT_GATEWAY_URL
from . import prompts as prompt_sets
from .runner import Target, run_level, table


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return values


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=DEFAULT_GATEWAY_URL, help="the endpoint's /v1 URL (default: %(default)s)")
    p.add_argument("--model", required=True, help="model name to request")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive_ints, default=[1], help="levels to sweep, e.g. 1,4,16")
    load.add_argument("--request-rate", type=float, help="Poisson arrivals per second instead of fixed concurrency")
    p.add_argument("--num-requests", type=int, default=32, help="measured requests per level (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="requests per level sent first and not counted")
    p.add_argument("--time-cap", type=float, default=600.0, help="seconds per level at most")
    p.add_argument("--dataset", choices=["synthetic", "sharegpt"], default="synthetic")
    p.add_argument("--sharegpt-path", type=Path, help="ShareGPT-format JSON file (with --dataset sharegpt)")
    p.add_argument("--input-len", type=int, default=32, help="synthetic prompt length in words (about tokens)")
    p.add_argument("--output-len", type=int, default=64, help="tokens asked of every request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests end early at end-of-sequence (by default they run to --output-len)")
    p.add_argument("--system", help="a system message for chat requests")
    p.add_argument("--slo-ttft-ms", type=float, help="goodput: requests whose TTFT is at most this")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput: requests whose TPOT is at most this")
    p.add_argument("--label", default="", help="a name for this run in the table and JSON lines")
    p.add_argument("--output", type=Path, help="append one JSON line per load level to this file")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def build_prompts(args) -> list:
    count = args.num_requests + args.warmup
    if args.dataset == "sharegpt":
        if not args.sharegpt_path:
            raise ValueError("--dataset sharegpt needs --sharegpt-path")
        items = prompt_sets.sharegpt(args.sharegpt_path, count, args.output_len, args.seed)
    else:
        items = prompt_sets.synthetic(count, args.input_len, args.output_len, args.seed)
    return items


async def run(args) -> list[dict]:
    if args.num_requests < 1 or args.warmup < 0 or args.time_cap <= 0:
        raise ValueError("--num-requests must be >= 1, --warmup >= 0, --time-cap > 0")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError("--request-rate must be positive")
    items = build_prompts(args)
    warm, measured = items[: args.warmup], items[args.warmup :]
    target = Target(args.base_url, args.model, args.endpoint, args.api_key, args.temperature, args.ignore_eos,
                    args.system)
    levels = [None] if args.request_rate else args.concurrency
    rows = []
    for level in levels:
        row = await run_level(
            target, measured, warm_prompts=warm, concurrency=level, rate=args.request_rate,
            time_cap=args.time_cap, seed=args.seed, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
            progress=args.progress,
        )
        row.update(label=args.label, dataset=args.dataset, input_len=args.input_len, output_len=args.output_len,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=f"{platform.node()} {platform.machine()}")
        rows.append(row)
        if args.output:
            with open(args.output, "a") as out:
                out.write(json.dumps(row) + "\n")
    return rows


def main(args) -> int:
    rows = asyncio.run(run(args))
    print(table(rows))
    return 0 if all(r["completed"] for r in rows) else 1
