"""Health checks for containers (deploy/compose.yaml): `python -m chatfabric.deploy.health ...`
exits 0 when the service is healthy, 1 (with the reason on stderr) when it is not.

- `http URL`: the URL answers 2xx within 5 s (the gateway's /health, the arena's /healthz).
- `consumer STREAM NAME`: the durable pull consumer exists and someone is pulling from it or
  working on what it delivered (a worker, the leaderboard follower, a judge, a trainer: services
  without an HTTP port). It joins NATS as the container's own role ($NATS_URL, $NATS_USER,
  $NATS_PASSWORD), which may look up its own consumer and nothing more.
- `worker MODEL`: `consumer` on the model's GEN consumer.

A process pulls in rounds (one fetch a second at most), so the check looks up to three times
before it calls a consumer idle. A worker whose every slot is busy does not pull; it reads as
healthy while it holds an unacknowledged request, and as unhealthy only if it stays full and
past its first tokens for the whole check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import urllib.request

from ..proto import subjects
from ..proto.auth import NatsAuth
from ..proto.bus import DEFAULT_URL
from ..proto.connection import probe_consumer

LOOKS = 3  # consumer look-ups before a consumer is called idle
LOOK_INTERVAL = 1.0  # seconds between them: the job runner's longest fetch


def check_http(url: str) -> str | None:
    """None when `url` answers 2xx, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return None if 200 <= response.status < 300 else f"{url} answered {response.status}"
    except OSError as err:  # URLError and HTTPError are OSErrors
        return f"{url}: {err}"


async def check_consumer(stream: str, name: str, url: str, auth: NatsAuth) -> str | None:
    """None when someone pulls from (or works on deliveries of) the durable `name`, else why not."""
    return await probe_consumer(url, auth, stream, name, looks=LOOKS, interval=LOOK_INTERVAL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chatfabric.deploy.health", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("http").add_argument("url")
    consumer = sub.add_parser("consumer")
    consumer.add_argument("stream")
    consumer.add_argument("name")
    sub.add_parser("worker").add_argument("model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check == "http":
        problem = check_http(args.url)
    else:
        stream, name = ((subjects.GEN_STREAM, subjects.gen_consumer(args.model)) if args.check == "worker"
                        else (args.stream, args.name))
        url = os.environ.get("NATS_URL") or DEFAULT_URL
        try:
            problem = asyncio.run(check_consumer(stream, name, url, NatsAuth.from_env()))
        except Exception as err:  # any failure to reach NATS is an unhealthy answer, said once
            problem = f"NATS at {url}: {type(err).__name__}: {err}"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
