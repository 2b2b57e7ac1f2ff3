"""`chatfabric arena serve`: the Chatbot Arena web UI (Gradio 6).

Tabs: an anonymous battle (two models drawn from the gateway's live `/v1/models`, hidden until
the vote), a named side-by-side battle, a direct chat, and the leaderboard. Models are reached
only through the gateway with the `openai` SDK (`arena/client.py`); votes, conversation logs and
feedback are events on the `ARENA` stream, stored with `Bus.publish_event`: a vote is confirmed
to the user only after JetStream acknowledged it, and a retried vote has the round's id, so it
is stored once. The browser's address appears in events only as a salted hash.

The Gradio app is mounted on a FastAPI app served by uvicorn inside this process's event loop,
on a socket bound here (a busy port is a clear error, port 0 picks a free one), next to the
bus connection the handlers use. `/healthz` answers for health checks. The handlers are
`handlers.py`, the page `page.py`, the flags and settings `config.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Callable

from .client import Gateway
from .config import ArenaConfig, add_args, bind, config_from_args  # noqa: F401 (add_args: `arena serve`'s flags)
from .handlers import Arena
from .page import build

log = logging.getLogger(__name__)


async def run(args, stop: asyncio.Event) -> None:
    from ..proto.bus import connect_from_args

    config = config_from_args(args)
    await asyncio.to_thread(_import_web_stack)  # a missing web stack is named before anything starts
    async with connect_from_args(args, "chatfabric-arena", stop, role="arena") as bus:
        await serve(bus, config, stop)


# -- the arena: handlers over one bus connection and one gateway client ---------------------------


# -- serving -------------------------------------------------------------------------------------


async def serve(bus, config: ArenaConfig, stop: asyncio.Event, *, sock: socket.socket | None = None,
                ready: Callable[[str], None] | None = None) -> None:
    """Serve the arena until `stop` is set. `ready(url)` is called once it listens."""
    # Importing Gradio takes seconds (tens, the first time, compiling it): never on the event
    # loop, which keeps the bus connection and, in `chatfabric up`, the gateway and workers going.
    await asyncio.to_thread(_import_web_stack)
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    sock = sock or bind(config.host, config.port)
    gateway = Gateway(config.gateway_url, config.api_key)
    arena = Arena(bus, gateway, config)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        ok = bus.connected
        return JSONResponse({"status": "ok" if ok else "bus unreachable"}, status_code=200 if ok else 503)

    def page():  # a second or two of CPU: off the event loop, where the bus and the models live
        demo = build(arena)
        demo.queue(default_concurrency_limit=config.concurrency)
        return gr.mount_gradio_app(app, demo, path="", footer_links=[], show_error=True)

    app = await asyncio.to_thread(page)
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    host, port = sock.getsockname()[:2]
    task = asyncio.create_task(server.serve(sockets=[sock]), name="arena-http")
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
            log.info("arena at %s (gateway %s)", url, config.gateway_url)
            if ready is not None:
                ready(url)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        server.should_exit = True
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.close()
        sock.close()


def _import_web_stack() -> None:
    import importlib

    for module in ("gradio", "uvicorn", "fastapi"):
        importlib.import_module(module)


class _Server:
    """uvicorn's server without its signal handling: the `chatfabric` command owns signals."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)
