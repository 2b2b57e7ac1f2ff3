"""Connection to the fabric and the JetStream objects of the bus contract.

`connect()` joins `NATS_URL` (or a given URL) or, with neither, starts the embedded server and
stops it on exit. `Bus.setup()` creates the GEN stream and the `workers` registry bucket
idempotently: whoever starts first creates them, everyone else binds to them.

A connection reconnects by itself for as long as it takes. One that the client library closes
for good (the server refused it: a protocol violation, revoked credentials) is never left
half-alive: `connect()` sets the process's stop event and raises `BusLost` on the way out, so
the process exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from . import subjects
from .auth import NatsAuth
from .embedded import EmbeddedServer
from .messages import AliveMessage, CancelMessage, GenerationRequest, WorkerCard, encode

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


class BusUnavailable(Exception):
    """JetStream did not answer in time: the server is restarting or unreachable."""


class BusLost(ConnectionError):
    """The NATS connection was closed for good (not a disconnect that reconnects)."""


# JetStream's answers while a server is (re)starting or unreachable: worth retrying.
_TRANSIENT = (nats.errors.NoRespondersError, nats.errors.TimeoutError, asyncio.TimeoutError,
              nats.errors.ConnectionReconnectingError)
PUBLISH_RETRY_SECONDS = 5.0
DRAIN_TIMEOUT = 5.0


class Bus:
    """An open NATS connection plus the JetStream handles of the contract."""

    def __init__(self, nc: NATS, config: BusConfig):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config
        self.registry: KeyValue | None = None
        self.reconnects = 0  # how many times the connection came back after a loss
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call `callback` each time the connection is re-established (e.g. to re-announce)."""
        self._on_reconnect.append(callback)

    async def _reconnected(self) -> None:
        self.reconnects += 1
        for callback in self._on_reconnect:
            try:
                await callback()
            except Exception as err:  # one listener's failure must not stop the others
                log.warning("reconnect listener failed: %s", err)

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def setup(self) -> "Bus":
        try:
            await self._ensure_gen_stream()
            self.registry = await self._ensure_registry()
        except _TRANSIENT as err:
            raise ConnectionError(
                f"JetStream did not answer while setting up the {subjects.GEN_STREAM} stream and the "
                f"'{subjects.REGISTRY_BUCKET}' bucket ({type(err).__name__}): is JetStream enabled on the server? "
                "On a secured fabric a worker may not create them: start a gateway (or `chatfabric up`) first"
            ) from None
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
            await self.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(model), timeout=2.0)
            return True
        except NotFoundError:
            return False
        except _TRANSIENT as err:
            raise BusUnavailable(f"JetStream did not answer: {type(err).__name__}") from None

    async def publish_request(self, request: GenerationRequest) -> None:
        """Publish into the GEN stream, retrying for a few seconds while JetStream is not ready
        (a server restarting); the request id as `Nats-Msg-Id` makes a retry that was in fact
        stored the first time a no-op."""
        headers = {"Nats-Msg-Id": request.request_id}
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        subject = subjects.gen_subject(request.model)
        payload = encode(request)
        give_up = asyncio.get_running_loop().time() + PUBLISH_RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                await self.js.publish(subject, payload, headers=headers, timeout=2.0)
                return
            except APIError as err:
                if err.err_code == ERR_MAX_MSGS_PER_SUBJECT:
                    raise QueueFull(request.model) from None
                raise
            except nats.errors.MaxPayloadError:
                raise PayloadTooLarge(self.nc.max_payload) from None
            except _TRANSIENT as err:
                if self.nc.is_closed or asyncio.get_running_loop().time() + delay > give_up:
                    raise BusUnavailable(f"JetStream did not accept the request: {type(err).__name__}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # -- core NATS: control and token planes -----------------------------------------------

    async def publish_chunk(self, reply_to: str, chunk) -> None:
        await self.nc.publish(reply_to, encode(chunk))

    async def publish_cancel(self, cancel: CancelMessage) -> None:
        await self.nc.publish(subjects.cancel_subject(cancel.request_id), encode(cancel))

    async def hand_back(self, ack_subject: str) -> bool:
        """Nak a GEN delivery on behalf of a worker that died before starting it, so JetStream
        redelivers it now rather than after `ack_wait`. Only GEN ack subjects are accepted."""
        if not ack_subject.startswith(f"$JS.ACK.{subjects.GEN_STREAM}.") or any(c in ack_subject for c in " *>"):
            return False
        await self.nc.publish(ack_subject, b"-NAK")
        return True

    async def publish_alive(self, alive: AliveMessage) -> None:
        await self.nc.publish(subjects.alive_subject(alive.worker_id), encode(alive))

    async def subscribe_cancels(self, callback):
        return await self.nc.subscribe(subjects.cancel_wildcard(), cb=callback)

    async def subscribe_alive(self, callback):
        return await self.nc.subscribe(subjects.alive_wildcard(), cb=callback)

    async def subscribe_replies(self, gateway_id: str, callback):
        return await self.nc.subscribe(f"{subjects.reply_prefix(gateway_id)}.*", cb=callback)

    async def put_card(self, card: WorkerCard) -> None:
        await self.registry.put(card.worker_id, encode(card))

    async def delete_card(self, worker_id: str) -> None:
        await self.registry.delete(worker_id)


@dataclass
class ConnectionWatch:
    """What the NATS client's callbacks tell the rest of the process: reconnections (to
    `listeners`) and a close for good (to `on_lost`, unless we are closing it ourselves)."""

    name: str
    on_lost: Callable[[str], None] | None = None
    listeners: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    closing: bool = False


async def open_connection(url: str, watch: ConnectionWatch | str, **options) -> NATS:
    """Connect with endless reconnects; a lost connection is logged, never fatal."""
    if isinstance(watch, str):
        watch = ConnectionWatch(watch)
    name = watch.name
    nc = NATS()

    async def on_error(err: Exception) -> None:
        log.warning("nats %s: %s", name, err)

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats %s: disconnected from %s, reconnecting", name, url)

    async def on_reconnect() -> None:
        log.info("nats %s: reconnected", name)
        for callback in watch.listeners:
            await callback()

    async def on_closed() -> None:
        if not watch.closing and watch.on_lost is not None:
            watch.on_lost(str(nc.last_error or "closed by the server"))

    await nc.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1.0,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        closed_cb=on_closed,
        **options,
    )
    return nc


async def close_connection(nc: NATS, watch: ConnectionWatch | None = None, timeout: float = DRAIN_TIMEOUT) -> None:
    """Drain (deliver what is buffered, then close) within `timeout`; close at once otherwise."""
    if watch is not None:
        watch.closing = True
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except Exception as err:  # draining a broken connection: closing is all that is left
        log.debug("drain failed (%s); closing", err)
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout)


@contextlib.asynccontextmanager
async def connect(config: BusConfig | None = None, name: str = "chatfabric",
                  stop: asyncio.Event | None = None, *, auth: NatsAuth | None = None,
                  role: str = "admin") -> AsyncIterator[Bus]:
    """Join the fabric at `config.url`, or start an embedded server when there is none.

    `auth` holds the credentials and TLS settings (none by default); `role` is the process's
    role on the bus (`proto/roles.py`), which picks its inbox prefix. If the connection is closed
    for good while in use, `stop` is set (the process shuts down) and `BusLost` is raised when
    the block exits."""
    config = config or BusConfig.from_env()
    options = (auth or NatsAuth()).connect_options(role)
    lost: list[str] = []

    def on_lost(reason: str) -> None:
        log.error("nats %s: the connection was closed for good (%s); stopping", name, reason)
        lost.append(reason)
        if stop is not None:
            stop.set()

    server = None
    url = config.url
    if url is None:
        server = EmbeddedServer(store_dir=config.store_dir)
        await asyncio.to_thread(server.start)
        url = server.url
    try:
        watch = ConnectionWatch(name, on_lost)
        nc = await open_connection(url, watch, **options)
        try:
            bus = Bus(nc, config)
            watch.listeners.append(bus._reconnected)
            yield await bus.setup()
        finally:
            await close_connection(nc, watch)
        if lost:
            raise BusLost(f"the NATS connection was closed: {lost[0]}")
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
