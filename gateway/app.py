"""The gateway process: configuration, middleware, and the aiohttp application's lifecycle."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from aiohttp import web

from ..proto.bus import Bus
from ..proto.defaults import GATEWAY_PORT
from .errors import APIError
from .generations import Generations
from . import metrics
from .metrics import metrics_middleware, tracing_middleware
from .registry import Registry
from .relay import Mailboxes
from .routes import CONFIG, GENERATIONS, check_api_key, routes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = GATEWAY_PORT
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float = 600.0  # seconds a request may wait and run in all
    heartbeat_timeout: float = 15.0  # silence on a started request that fails it (504)
    liveness_timeout: float = 3.0  # least silence of a worker's liveness beats that counts it dead
    max_prompts: int = 32  # prompts in one /v1/completions request
    max_choices: int = 64  # completions (prompts x n) in one request
    shutdown_grace: float = 10.0  # seconds running responses get to finish on shutdown
    gateway_id: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError("--max-body-bytes must be at least 1024")
        if min(self.request_timeout, self.heartbeat_timeout, self.liveness_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_prompts < 1 or self.max_choices < 1:
            raise ValueError("--max-prompts and --max-choices must be at least 1")
        if self.shutdown_grace < 0:
            raise ValueError("--shutdown-grace must not be negative")
        if any(not k for k in self.api_keys):
            raise ValueError("API keys must not be empty strings")
        if not self.gateway_id:
            object.__setattr__(self, "gateway_id", uuid.uuid4().hex[:12])


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as err:
        return err.response()
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = "request_too_large" if err.status == 413 else None
        return APIError(err.status, err.text or err.reason, code=code).response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return APIError(500, "Internal server error.", code="internal_error").response()


@web.middleware
async def auth_middleware(request: web.Request, handler):
    if request.path.startswith("/v1/"):
        check_api_key(request)
    return await handler(request)


async def metrics_page(request: web.Request) -> web.Response:
    return await metrics.page(request.app.get(GENERATIONS))


def create_app(bus: Bus, config: GatewayConfig) -> web.Application:
    app = web.Application(
        middlewares=[metrics_middleware, tracing_middleware, error_middleware, auth_middleware],
        client_max_size=config.max_body_bytes,
    )
    app[CONFIG] = config
    app.add_routes(routes)
    app.router.add_get("/metrics", metrics_page)

    async def fabric(app: web.Application):
        registry = Registry(bus, config.liveness_timeout)
        mailboxes = Mailboxes(bus, config.gateway_id)
        await registry.start()
        await mailboxes.start()
        app[GENERATIONS] = Generations(
            bus,
            registry,
            mailboxes,
            request_timeout=config.request_timeout,
            heartbeat_timeout=config.heartbeat_timeout,
        )
        yield
        await mailboxes.stop()
        await registry.stop()

    app.cleanup_ctx.append(fabric)
    return app


async def serve(bus: Bus, config: GatewayConfig, stop: asyncio.Event) -> None:
    """Run the gateway until `stop` is set. Client disconnects cancel their handlers (and so
    their generations)."""
    runner = web.AppRunner(create_app(bus, config), handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.shutdown_grace)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info("gateway listening on http://%s:%d", config.host, config.port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
