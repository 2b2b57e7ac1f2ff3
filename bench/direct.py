"""A baseline for the fabric's overhead: an aiohttp server that streams `max_tokens` OpenAI-style
SSE chunks straight from the HTTP handler, with no bus and no worker.

    python -m chatfabric.bench.direct --port 8300

`chatfabric bench` against it and against a gateway with a `--backend synthetic` worker, at the
same load, gives the latency the fabric adds (gateway + NATS + worker)."""

from __future__ import annotations

import argparse
import json
import time

from aiohttp import web


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n = int(body.get("max_tokens") or 16)
    chat = request.path.endswith("chat/completions")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    head = {"id": "direct", "created": int(time.time()), "model": body.get("model", "direct")}
    for _ in range(n):
        choice = {"index": 0, "delta": {"content": " hello"}} if chat else {"index": 0, "text": " hello"}
        await response.write(b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n")
    usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
    await response.write(b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
