"""Connection to the fabric, and typed publish/subscribe for every plane.

`connect()` joins `NATS_URL` (or a given URL) or, with neither, starts the embedded server and
stops it on exit. `Bus.setup()` ensures the contract's streams, buckets and object store
(`proto/contract.py`) or only binds to them, depending on the process's role. `Bus` publishes
requests, chunks, cancels, liveness beats and events, and puts and gets artifacts, so that no
component outside `proto` touches the raw connection (`proto/replay.py` reads event streams).

A connection reconnects by itself for as long as it takes. One that the client library closes
for good (the server refused it: a protocol violation, revoked credentials) is never left
half-alive: `connect()` sets the process's stop event and raises `BusLost` on the way out, so
the process exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import (APIError, BucketNotFoundError, NoStreamResponseError,
                            NotFoundError, ObjectNotFoundError)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from . import contract, subjects
from .auth import NatsAuth
from .embedded import EmbeddedServer
from .events import ArtifactRef, Event, job_event_model
from .messages import AliveMessage, CancelMessage, GenerationRequest, MessageError, WorkerCard, decode, encode
from .roles import role as find_role

log = logging.getLogger(__name__)

# JetStream error code for "maximum messages per subject exceeded" (discard-new per subject).
ERR_MAX_MSGS_PER_SUBJECT = 10077

# Reading an artifact: seconds to wait for each chunk, and how many versions to try when the
# object is replaced while it is read.
_CHUNK_WAIT = 5.0
_OBJECT_READ_ATTEMPTS = 5


@dataclass(frozen=True)
class BusConfig:
    """Settings shared by every process on one fabric. `from_env` reads CHATFABRIC_* overrides.

    The settings below `url`, `store_dir` and `server_order` shape the fabric's JetStream objects
    (`proto/contract.py`); a process that ensures the contract brings the server in line with
    them, so every such process of one fabric should be started with the same values."""

    url: str | None = None  # one server, or a cluster's nodes separated by commas
    store_dir: Path | None = None
    server_order: str = "random"  # which listed node to try first: random (NATS' default) or listed
    ack_wait: float = 30.0  # seconds a pulled, unstarted request stays un-acked before redelivery
    max_deliver: int = -1  # unlimited: a request is redelivered until its deadline passes
    queue_limit: int = 256  # requests waiting per model before the gateway answers 429
    registry_ttl: float = 10.0  # seconds a worker card lives without a refresh
    request_max_age: float = 3600.0
    replicas: int = 1  # copies of every stream, bucket and object store: 3 on a cluster
    duplicate_window: float = 120.0  # seconds within which a re-published Nats-Msg-Id is stored once
    events_max_age: float = 7 * 86400.0  # seconds EVENTS keeps job progress and results; 0: forever
    arena_max_age: float = 0.0  # seconds ARENA keeps votes and conversations; 0: forever

    def __post_init__(self) -> None:
        for name in ("ack_wait", "registry_ttl", "request_max_age", "duplicate_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.server_order not in ("random", "listed"):
            raise ValueError(f"server_order must be 'random' or 'listed', got {self.server_order!r}")
        if self.queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ValueError("max_deliver must be -1 (unlimited) or at least 1")
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"replicas must be between 1 and 5 (JetStream's limit), got {self.replicas}")
        for name in ("request_max_age", "events_max_age", "arena_max_age"):
            age = getattr(self, name)
            if age < 0:
                raise ValueError(f"{name} must be 0 (no limit) or positive, got {age}")
            if 0 < age < self.duplicate_window:  # JetStream refuses such a stream
                raise ValueError(f"duplicate_window ({self.duplicate_window:g} s) must not exceed {name} ({age:g} s)")

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


DEFAULT_URL = "nats://127.0.0.1:4222"  # where gateways and workers look when no URL is given


class QueueFull(Exception):
    """The model's request queue in the GEN stream is at its limit."""


class PayloadTooLarge(Exception):
    """The message is larger than the server's max_payload."""


class BusUnavailable(Exception):
    """JetStream did not answer in time: the server is restarting or unreachable."""


class BusLost(ConnectionError):
    """The NATS connection was closed for good (not a disconnect that reconnects)."""


class EventNotStored(BusUnavailable):
    """JetStream did not confirm an event: it must not be reported as saved."""


class ArtifactMismatch(Exception):
    """An artifact is missing, or its content is not what its reference pins."""


class _Unconfirmed(Exception):
    """A JetStream publish that got no answer for as long as it was retried."""


# JetStream's answers while a server is (re)starting or unreachable: worth retrying.
_TRANSIENT = (nats.errors.NoRespondersError, nats.errors.TimeoutError, asyncio.TimeoutError,
              nats.errors.ConnectionReconnectingError)
# ...and for what is stored, also a stream that does not answer (JetStream still starting, the
# stream not created yet, or on a cluster its leader lost and the next one not elected yet): a
# request or a vote is worth a few seconds, never a false confirmation.
_STORE_TRANSIENT = (*_TRANSIENT, NoStreamResponseError)
_EVENT_TRANSIENT = _STORE_TRANSIENT
PUBLISH_RETRY_SECONDS = 5.0
EVENT_RETRY_SECONDS = 3.0
DRAIN_TIMEOUT = 5.0


class Bus:
    """An open NATS connection plus the JetStream handles of the contract."""

    def __init__(self, nc: NATS, config: BusConfig):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config
        self.contract = contract.build_contract(config)
        self.registry: KeyValue | None = None
        self._stores: dict[str, ObjectStore] = {}  # object stores bound so far, by bucket
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

    async def setup(self, ensure: bool = True) -> "Bus":
        """Ensure the whole contract (`ensure=True`: gateways, `chatfabric up`, operators) and
        bind the worker registry, or leave both to the objects' first use (any other role: a
        worker may not create streams on a secured fabric, and only workers and gateways read
        the registry, `registry_bucket`)."""
        if not ensure:
            return self
        try:
            await self.ensure_contract()
            await self.registry_bucket()
        except _TRANSIENT as err:
            raise ConnectionError(
                f"JetStream did not answer while ensuring the fabric's streams "
                f"and buckets ({type(err).__name__}): is JetStream enabled on the server? On a secured fabric "
                "only a gateway (or `chatfabric up`, or an admin) may create them: start one first"
            ) from None
        return self

    async def ensure(self, spec: contract.Spec) -> None:
        """Create one object of the contract, or bring the existing one in line with it:
        `contract.ContractMismatch` when JetStream cannot change the difference in place."""
        await contract.ensure(self.js, spec)

    async def ensure_contract(self) -> None:
        """Ensure every stream, bucket and object store; one error lists every mismatch."""
        refused = []
        for spec in self.contract.specs():
            try:
                await self.ensure(spec)
            except contract.ContractMismatch as err:
                refused.append(str(err))
        if refused:
            raise contract.ContractMismatch("the fabric differs from this process's contract:\n" + "\n".join(refused))

    async def registry_bucket(self) -> KeyValue:
        """The worker registry (bound on first use); `contract.ContractMissing` when the bucket
        does not exist yet."""
        if self.registry is None:
            try:
                self.registry = await self.js.key_value(subjects.REGISTRY_BUCKET)
            except BucketNotFoundError:
                raise contract.ContractMissing(
                    f"the '{subjects.REGISTRY_BUCKET}' bucket does not exist: a gateway (or `chatfabric up`) "
                    "creates it; start one first") from None
        return self.registry

    async def ensure_consumer(self, model: str) -> JetStreamContext.PullSubscription:
        """Bind to (creating or updating if needed) the durable pull consumer shared by a model's
        workers; `contract.ContractMissing` when the GEN stream does not exist yet."""
        spec = contract.gen_consumer(self.config, model)
        await self.ensure(spec)
        return await self.js.pull_subscribe_bind(spec.name, stream=spec.stream)

    async def model_was_served(self, model: str) -> bool:
        """True when some worker ever created this model's consumer (it outlives its workers)."""
        try:
            await self.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(model), timeout=2.0)
            return True
        except NotFoundError:
            return False
        except _TRANSIENT as err:
            raise BusUnavailable(f"JetStream did not answer: {type(err).__name__}") from None

    async def queue_depth(self, model: str) -> int:
        """Requests for `model` waiting in GEN for a worker to take them (0 when none ever did)."""
        try:
            info = await self.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(model), timeout=1.0)
        except NotFoundError:
            return 0
        return info.num_pending

    async def publish_request(self, request: GenerationRequest) -> None:
        """Publish into the GEN stream, retrying for a few seconds while JetStream is not ready
        (a server restarting, a cluster electing the stream's next leader); the request id as
        `Nats-Msg-Id` makes a retry that was in fact stored the first time a no-op."""
        headers = {"Nats-Msg-Id": request.request_id}
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        try:
            await self._store(subjects.gen_subject(request.model), encode(request), headers,
                              PUBLISH_RETRY_SECONDS, _STORE_TRANSIENT)
        except APIError as err:
            if err.err_code == ERR_MAX_MSGS_PER_SUBJECT:
                raise QueueFull(request.model) from None
            raise
        except nats.errors.MaxPayloadError:
            raise PayloadTooLarge(self.nc.max_payload) from None
        except _Unconfirmed as err:
            raise BusUnavailable(f"JetStream did not accept the request: {err}") from None

    async def _store(self, subject: str, payload: bytes, headers: dict, retry_for: float,
                     transient: tuple[type[BaseException], ...]) -> api.PubAck:
        """A JetStream publish that returns the server's acknowledgement, retried with backoff
        for `retry_for` seconds while the server does not answer; `_Unconfirmed` after that."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + retry_for
        delay = 0.05
        while True:
            try:
                timeout = max(min(2.0, give_up - loop.time()), 0.2)
                return await self.js.publish(subject, payload, headers=headers, timeout=timeout)
            except transient as err:
                if self.nc.is_closed or loop.time() + delay > give_up:
                    raise _Unconfirmed(type(err).__name__) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # -- the event plane: JetStream, replayable ------------------------------------------------

    async def publish_event(self, event: Event, retry_for: float = EVENT_RETRY_SECONDS) -> api.PubAck:
        """Store `event` in its stream and return JetStream's acknowledgement: `seq`, and
        `duplicate` True when an event with the same id was already stored within the duplicate
        window (publishing again is always safe). Raises `EventNotStored` when JetStream did not
        confirm it within `retry_for` seconds: never report such an event as saved."""
        try:
            return await self._store(event.subject(), encode(event), {"Nats-Msg-Id": event.id}, retry_for,
                                     _EVENT_TRANSIENT)
        except _Unconfirmed as err:
            raise EventNotStored(
                f"{type(event).__name__} {event.id} was not confirmed by JetStream within {retry_for:g} s ({err}); "
                f"it may still be stored once the server is back, and publishing it again is safe"
            ) from None
        except nats.errors.ConnectionClosedError:
            raise EventNotStored(f"{type(event).__name__} {event.id}: the connection is closed") from None

    async def _object_store(self, bucket: str) -> ObjectStore:
        """One of the contract's object stores (`subjects.ARTIFACT_BUCKETS`), bound on first use."""
        if bucket not in subjects.ARTIFACT_BUCKETS:
            raise ValueError(f"no object store called {bucket!r} (the fabric's: {', '.join(subjects.ARTIFACT_BUCKETS)})")
        if bucket not in self._stores:
            try:
                self._stores[bucket] = await self.js.object_store(bucket)
            except BucketNotFoundError:
                raise contract.ContractMissing(
                    f"the '{bucket}' object store does not exist: a gateway creates it") from None
        return self._stores[bucket]

    async def put_artifact(self, bucket: str, name: str, data: bytes, description: str | None = None) -> ArtifactRef:
        """Store `data` as `name` in `bucket` (replacing an older version) and return a reference
        that pins this content by its sha256. A role writes only the bucket it owns."""
        store = await self._object_store(bucket)
        digest = hashlib.sha256(data).hexdigest()
        await store.put(name, data, meta=api.ObjectMeta(name=name, description=description))
        return ArtifactRef(bucket=bucket, name=name, digest=f"sha256:{digest}", size=len(data))

    async def get_artifact(self, ref: ArtifactRef) -> bytes:
        """The content `ref` points at; `ArtifactMismatch` when the stored object is not it (it
        was replaced since, or damaged)."""
        data = await self._read_object(ref.bucket, ref.name)
        if data is None:
            raise ArtifactMismatch(f"artifact {ref.name!r} is not in '{ref.bucket}'")
        found = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if found != ref.digest or len(data) != ref.size:
            raise ArtifactMismatch(f"artifact {ref.name!r} changed since it was referenced: "
                                   f"{ref.digest} ({ref.size} bytes) wanted, {found} ({len(data)} bytes) stored")
        return data

    async def read_artifact(self, bucket: str, name: str) -> bytes | None:
        """The current content stored as `name` in `bucket`, or None when there is none
        (unpinned: for records a process keeps and finds again by name, such as a judge's answers)."""
        return await self._read_object(bucket, name)

    async def _read_object(self, bucket: str, name: str) -> bytes | None:
        """Read `name` chunk by chunk, waiting at most `_CHUNK_WAIT` for each. nats-py's own
        `ObjectStore.get` waits forever, and keeps its subscription, when the object is replaced
        while it is read (the new version's `put` purges the old chunks): here such a read starts
        over on the new version."""
        store = await self._object_store(bucket)
        nuid = None
        for _ in range(_OBJECT_READ_ATTEMPTS):
            try:
                info = await store.get_info(name)
            except ObjectNotFoundError:
                return None
            if info.nuid == nuid:  # the same version again: its chunks are gone, not replaced
                break
            nuid = info.nuid
            if not info.size:
                return b""
            data = await self._read_chunks(info)
            if data is not None:
                return data
        raise ArtifactMismatch(f"artifact {name!r} is damaged: its chunks could not be read "
                               f"within {_CHUNK_WAIT:g} s each")

    async def _read_chunks(self, info: api.ObjectInfo) -> bytes | None:
        """The chunks of one version of an object, checked against its digest; None when a chunk
        did not come within `_CHUNK_WAIT` (the version was replaced meanwhile, or is damaged)."""
        sub = await self.js.subscribe(f"$O.{info.bucket}.C.{info.nuid}", ordered_consumer=True)
        digest, parts = hashlib.sha256(), []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=_CHUNK_WAIT)
                except nats.errors.TimeoutError:
                    return None
                digest.update(msg.data)
                parts.append(msg.data)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        wanted = base64.urlsafe_b64decode(info.digest.split("=", 1)[1]) if info.digest else None
        if wanted is not None and digest.digest() != wanted:
            raise ArtifactMismatch(f"artifact {info.name!r} is damaged: its chunks do not match its digest")
        return b"".join(parts)

    async def has_artifact(self, bucket: str, name: str) -> bool:
        """Whether an object called `name` is stored in `bucket` (one lookup, its content not read)."""
        store = await self._object_store(bucket)
        try:
            await store.get_info(name)
            return True
        except ObjectNotFoundError:
            return False

    # -- the job plane: durable consumers on JOBS, job events on EVENTS ------------------------

    async def job_subscription(self, kind: str) -> JetStreamContext.PullSubscription:
        """Bind to (creating if needed) the durable pull consumer shared by every runner of one
        job kind (`judge`, `train`); `contract.ContractMissing` when JOBS does not exist yet."""
        spec = contract.job_consumer(self.config, kind)
        await self.ensure(spec)
        return await self.js.pull_subscribe_bind(spec.name, stream=spec.stream)

    async def last_event(self, model: type[Event], subject: str) -> Event | None:
        """The last event stored on `subject` (None: none, or it does not validate)."""
        try:
            msg = await self.js.get_last_msg(model.STREAM, subject)
        except NotFoundError:
            return None
        try:
            return decode(model, msg.data or b"")
        except MessageError as err:
            log.warning("%s: the last message on %s does not validate: %s", model.STREAM, subject, err)
            return None

    @contextlib.asynccontextmanager
    async def follow_job_events(self, subject_filter: str, since: float | None = None
                                ) -> AsyncIterator[asyncio.Queue]:
        """Hear job events (`JobProgress`, `JobResult`, `JobCancel`) on `subject_filter` as they
        are stored, from `since` (unix time; None: only new ones), through an ordered consumer
        of EVENTS. Yields a queue of validated events; others are logged and skipped."""
        events: asyncio.Queue = asyncio.Queue()

        async def deliver(msg) -> None:
            model = job_event_model(msg.subject)
            if model is None:
                return
            try:
                events.put_nowait(decode(model, msg.data))
            except MessageError as err:
                log.warning("skipped an event on %s: %s", msg.subject, err)

        config = api.ConsumerConfig()
        if since is not None:
            start = datetime.datetime.fromtimestamp(since, datetime.timezone.utc)
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=start)
        sub = await self.js.subscribe(subject_filter, stream=subjects.EVENTS_STREAM, cb=deliver,
                                      ordered_consumer=True, config=config,
                                      deliver_policy=None if since is not None else api.DeliverPolicy.NEW)
        try:
            yield events
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

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
        await (await self.registry_bucket()).put(card.worker_id, encode(card))

    async def delete_card(self, worker_id: str) -> None:
        await (await self.registry_bucket()).delete(worker_id)


@dataclass
class ConnectionWatch:
    """What the NATS client's callbacks tell the rest of the process: reconnections (to
    `listeners`) and a close for good (to `on_lost`, unless we are closing it ourselves)."""

    name: str
    on_lost: Callable[[str], None] | None = None
    listeners: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    closing: bool = False


def server_urls(url: str) -> list[str]:
    """The servers of a URL that may list a cluster's nodes: `nats://a:4222,nats://b:4222`."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no NATS server in {url!r}")
    return urls


async def open_connection(url: str, watch: ConnectionWatch, **options) -> NATS:
    """Connect with endless reconnects; a lost connection is logged, never fatal. `url` may list
    several servers separated by commas (a cluster's nodes): the client connects to one, and on
    losing it reconnects to another (and to nodes the cluster announces)."""
    name = watch.name
    nc = NATS()
    servers = server_urls(url)

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
        servers if len(servers) > 1 else servers[0],
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
                  role: str | None = None) -> AsyncIterator[Bus]:
    """Join the fabric at `config.url`, or start an embedded server when there is none.

    `auth` holds the credentials and TLS settings (none by default). `role` is the process's
    role on the bus (`proto/roles.py`): it picks the inbox prefix and what `Bus.setup` does. A
    role that owns the contract (`Role.ensures_contract`: gateway, admin, so `chatfabric up`)
    ensures every stream, bucket and object store; any other role only binds to them. No role
    is a connection that only looks (tests, tools): admin's inbox, binding only, unless it
    started the embedded server, whose fabric is then its own. If the connection is closed
    for good while in use, `stop` is set (the process shuts down) and `BusLost` is raised when
    the block exits."""
    config = config or BusConfig.from_env()
    options = (auth or NatsAuth()).connect_options(role or "admin")
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
        nc = await open_connection(url, watch, dont_randomize=config.server_order == "listed", **options)
        try:
            bus = Bus(nc, config)
            watch.listeners.append(bus._reconnected)
            owner = server is not None or (role is not None and find_role(role).ensures_contract)
            yield await bus.setup(ensure=owner)
        finally:
            await close_connection(nc, watch)
        if lost:
            raise BusLost(f"the NATS connection was closed: {lost[0]}")
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
