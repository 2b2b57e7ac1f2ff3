"""The gateway process: configuration, middleware, and the aiohttp application's lifecycle."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from dataclasses import dataclass

from aiohttp import web

from ..proto.bus import Bus
from .errors import APIError
from .generations import Generations
from .registry import Registry
from .relay import Mailboxes
from .routes import CONFIG, GENERATIONS, routes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float = 600.0  # seconds a request may wait and run in all
    heartbeat_timeout: float = 15.0  # silence after the first token that fails a request (504)
    gateway_id: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError("--max-body-bytes must be at least 1024")
        if self.request_timeout <= 0 or self.heartbeat_timeout <= 0:
            raise ValueError("timeouts must be positive")
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
    keys = request.app[CONFIG].api_keys
    if keys and request.path.startswith("/v1/"):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401, "Missing API key: send the header 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )
        if not any(secrets.compare_digest(token.strip(), key) for key in keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return await handler(request)


def create_app(bus: Bus, config: GatewayConfig) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=config.max_body_bytes
    )
    app[CONFIG] = config
    app.add_routes(routes)

    async def fabric(app: web.Application):
        registry = Registry(bus)
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
    runner = web.AppRunner(create_app(bus, config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info("gateway listening on http://%s:%d", config.host, config.port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
