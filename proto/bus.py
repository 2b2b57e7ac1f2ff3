"""Connection to the fabric and the JetStream objects of the bus contract.

`connect()` joins `NATS_URL` (or a given URL) or, with neither, starts the embedded server and
stops it on exit. `Bus.setup()` creates the GEN stream and the `workers` registry bucket
idempotently: whoever starts first creates them, everyone else binds to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import AsyncIterator

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from . import subjects
from .embedded import EmbeddedServer
from .messages import GenerationRequest, WorkerCard, encode

log = logging.getLogger(__name__)

# JetStream error code for "maximum messages per subject exceeded" (discard-new per subject).
ERR_MAX_MSGS_PER_SUBJECT = 10077


@dataclass(frozen=True)
class BusConfig:
    """Settings shared by every process on one fabric. `from_env` reads CHATFABRIC_* overrides."""

    url: str | None = None
    store_dir: Path | None = None
    ack_wait: float = 30.0  # seconds a pulled, unstarted request stays un-acked before redelivery
    max_deliver: int = -1  # unlimited: a request is redelivered until its deadline passes
    queue_limit: int = 256  # requests waiting per model before the gateway answers 429
    registry_ttl: float = 10.0  # seconds a worker card lives without a refresh
    request_max_age: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("ack_wait", "registry_ttl", "request_max_age"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ValueError("max_deliver must be -1 (unlimited) or at least 1")

    @classmethod
    def from_env(cls, **overrides) -> "BusConfig":
        values: dict = {"url": os.environ.get("NATS_URL") or None}
        for f in fields(cls):
            raw = os.environ.get(f"CHATFABRIC_{f.name.upper()}")
            if raw is None or f.name == "url":
                continue
            try:
                values[f.name] = Path(raw) if f.name == "store_dir" else type(getattr(cls, f.name))(raw)
            except ValueError:
                raise ValueError(f"CHATFABRIC_{f.name.upper()}={raw!r} is not a valid {f.name}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class QueueFull(Exception):
    """The model's request queue in the GEN stream is at its limit."""


class PayloadTooLarge(Exception):
    """The message is larger than the server's max_payload."""


class Bus:
    """An open NATS connection plus the JetStream handles of the contract."""

    def __init__(self, nc: NATS, config: BusConfig):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config
        self.registry: KeyValue | None = None

    async def setup(self) -> "Bus":
        await self._ensure_gen_stream()
        self.registry = await self._ensure_registry()
        return self

    async def _ensure_gen_stream(self) -> None:
        wanted = api.StreamConfig(
            name=subjects.GEN_STREAM,
            subjects=[f"{subjects.GEN_PREFIX}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=self.config.queue_limit,
            max_age=self.config.request_max_age,
            duplicate_window=120.0,
        )
        try:
            await self.js.stream_info(subjects.GEN_STREAM)
        except NotFoundError:
            try:
                await self.js.add_stream(wanted)
            except BadRequestError:
                pass  # created concurrently by another process: same contract, nothing to do

    async def _ensure_registry(self) -> KeyValue:
        try:
            return await self.js.key_value(subjects.REGISTRY_BUCKET)
        except BucketNotFoundError:
            return await self.js.create_key_value(
                bucket=subjects.REGISTRY_BUCKET,
                ttl=self.config.registry_ttl,
                history=1,
                limit_marker_ttl=max(self.config.registry_ttl, 1.0),
            )

    async def ensure_consumer(self, model: str) -> JetStreamContext.PullSubscription:
        """Bind to (creating if needed) the durable pull consumer shared by a model's workers."""
        config = api.ConsumerConfig(
            durable_name=subjects.gen_consumer(model),
            filter_subject=subjects.gen_subject(model),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait,
            max_deliver=self.config.max_deliver,
            max_waiting=512,
        )
        return await self.js.pull_subscribe(
            subjects.gen_subject(model),
            durable=subjects.gen_consumer(model),
            stream=subjects.GEN_STREAM,
            config=config,
        )

    async def model_was_served(self, model: str) -> bool:
        """True when some worker ever created this model's consumer (it outlives its workers)."""
        try:
            await self.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(model))
            return True
        except NotFoundError:
            return False

    async def publish_request(self, request: GenerationRequest) -> None:
        headers = {"Nats-Msg-Id": request.request_id}
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        try:
            await self.js.publish(
                subjects.gen_subject(request.model), encode(request), headers=headers
            )
        except APIError as err:
            if err.err_code == ERR_MAX_MSGS_PER_SUBJECT:
                raise QueueFull(request.model) from None
            raise
        except nats.errors.MaxPayloadError:
            raise PayloadTooLarge(self.nc.max_payload) from None

    async def put_card(self, card: WorkerCard) -> None:
        await self.registry.put(card.worker_id, encode(card))

    async def delete_card(self, worker_id: str) -> None:
        await self.registry.delete(worker_id)


async def open_connection(url: str, name: str) -> NATS:
    """Connect with endless reconnects; a lost connection is logged, never fatal."""
    nc = NATS()

    async def on_error(err: Exception) -> None:
        log.warning("nats %s: %s", name, err)

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats %s: disconnected from %s, reconnecting", name, url)

    async def on_reconnect() -> None:
        log.info("nats %s: reconnected", name)

    await nc.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1.0,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    return nc


@contextlib.asynccontextmanager
async def connect(config: BusConfig | None = None, name: str = "chatfabric") -> AsyncIterator[Bus]:
    """Join the fabric at `config.url`, or start an embedded server when there is none."""
    config = config or BusConfig.from_env()
    server = None
    url = config.url
    if url is None:
        server = EmbeddedServer(store_dir=config.store_dir)
        await asyncio.to_thread(server.start)
        url = server.url
    try:
        nc = await open_connection(url, name)
        try:
            yield await Bus(nc, config).setup()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
