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
import contextlib
import datetime
import logging
from typing import AsyncIterator, Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import (APIError, BucketNotFoundError, NoStreamResponseError,
                            NotFoundError, ServiceUnavailableError)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from . import contract, reconcile, subjects
from .bus_errors import BusLost, BusUnavailable, EventNotStored, PayloadTooLarge, QueueFull
from .connection import ConnectionWatch, close_connection, open_connection
from .objects import ObjectPlane
from .pull import Pull
from .bus_config import DEFAULT_URL, BusConfig
from .auth import NatsAuth
from .embedded import EmbeddedServer
from .events import Event, job_event_model
from .messages import (AliveMessage, CancelMessage, Chunk, GenerationRequest, MessageError, WorkerCard, decode,
                       decode_chunks, encode)
from .outbox import Outbox
from .roles import role as find_role

log = logging.getLogger(__name__)

# JetStream error code for "maximum messages per subject exceeded" (discard-new per subject).
ERR_MAX_MSGS_PER_SUBJECT = 10077


class _Unconfirmed(Exception):
    """A JetStream publish that got no answer for as long as it was retried."""


# JetStream's answers while a server is (re)starting or unreachable: worth retrying.
_TRANSIENT = (nats.errors.NoRespondersError, nats.errors.TimeoutError, asyncio.TimeoutError,
              nats.errors.ConnectionReconnectingError)
# ...and for what is stored, also a stream that does not answer (JetStream still starting, the
# stream not created yet, or on a cluster its leader lost and the next one not elected yet): a
# request or a vote is worth a few seconds, never a false confirmation.
_STORE_TRANSIENT = (*_TRANSIENT, NoStreamResponseError)
# ...and while joining (ensuring or binding the contract's objects, putting the first card): also
# JetStream answering that it is not ready yet. Every such step is idempotent, so it is retried.
_JOIN_TRANSIENT = (*_TRANSIENT, ServiceUnavailableError)
_EVENT_TRANSIENT = _STORE_TRANSIENT
PUBLISH_RETRY_SECONDS = 5.0
EVENT_RETRY_SECONDS = 3.0


class Subscription:
    """A core NATS subscription the bus opened for a component: it can only be ended."""

    def __init__(self, sub):
        self._sub = sub

    async def unsubscribe(self) -> None:
        with contextlib.suppress(nats.errors.Error):  # a closed connection has none left
            await self._sub.unsubscribe()


class Bus(ObjectPlane):
    """An open NATS connection plus the JetStream handles of the contract."""

    def __init__(self, nc: NATS, config: BusConfig):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config
        self.contract = contract.build_contract(config)
        self.registry: KeyValue | None = None
        self._stores: dict[str, ObjectStore] = {}  # object stores bound so far, by bucket
        self._outboxes: list[Outbox] = []
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
    def closed(self) -> bool:
        """Closed for good (not reconnecting): nothing will be sent or received any more."""
        return self.nc.is_closed

    @property
    def connected_url(self):
        """The server this connection is on (a parsed URL), for people to read."""
        return self.nc.connected_url

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
        except _JOIN_TRANSIENT as err:
            raise ConnectionError(
                f"JetStream did not answer while ensuring the fabric's streams "
                f"and buckets ({type(err).__name__}): is JetStream enabled on the server? On a secured fabric "
                "only a gateway (or `chatfabric up`, or an admin) may create them: start one first"
            ) from None
        return self

    async def ensure(self, spec: contract.Spec) -> None:
        """Create one object of the contract, or bring the existing one in line with it:
        `contract.ContractMismatch` when JetStream cannot change the difference in place."""
        await self._joining(lambda: reconcile.ensure(self.js, spec), spec.label)

    async def _joining(self, step: Callable[[], Awaitable], what: str):
        """Run one idempotent step of joining the fabric, retrying it for `config.join_wait`
        seconds while JetStream does not answer (a server starting, a cluster electing the
        stream's leader, a node too busy to answer within the request timeout); the last error
        after that."""
        return await self._retrying(lambda _left: step(), self.config.join_wait, _JOIN_TRANSIENT,
                                    delay=0.1, max_delay=2.0, what=what)

    async def _retrying(self, step: Callable[[float], Awaitable], within: float,
                        transient: tuple[type[BaseException], ...], *, delay: float, max_delay: float,
                        what: str | None = None):
        """`step(seconds left)`, retried with doubling backoff for `within` seconds while it
        raises one of `transient` (logged when `what` names it); the last such error after that,
        or at once when the connection is closed for good."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within
        while True:
            try:
                return await step(give_up - loop.time())
            except transient as err:
                if self.nc.is_closed or loop.time() + delay > give_up:
                    raise
                if what is not None:
                    log.info("%s: JetStream did not answer (%s); retrying", what, type(err).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)

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
                self.registry = await self._joining(lambda: self.js.key_value(subjects.REGISTRY_BUCKET),
                                                    f"the '{subjects.REGISTRY_BUCKET}' bucket")
            except BucketNotFoundError:
                raise contract.ContractMissing(
                    f"the '{subjects.REGISTRY_BUCKET}' bucket does not exist: a gateway (or `chatfabric up`) "
                    "creates it; start one first") from None
        return self.registry

    async def ensure_consumer(self, model: str) -> Pull:
        """Bind to (creating or updating if needed) the durable pull consumer shared by a model's
        workers; `contract.ContractMissing` when the GEN stream does not exist yet."""
        return await self.pull(contract.gen_consumer(self.config, model), "generation")

    async def pull(self, spec: contract.ConsumerSpec, name: str) -> Pull:
        """Bind to (creating or updating if needed) the durable pull consumer `spec` declares."""
        await self.ensure(spec)
        return await self._joining(lambda: Pull(self.nc, spec.stream, spec.name, name).open(), spec.label)

    async def last_seq(self, stream: str) -> int:
        """The sequence of the last message `stream` holds (0 when empty);
        `contract.ContractMissing` when the stream does not exist."""
        try:
            return (await self.js.stream_info(stream)).state.last_seq
        except NotFoundError:
            raise contract.missing_stream(stream) from None

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
        def publish(left: float):
            return self.js.publish(subject, payload, headers=headers, timeout=max(min(2.0, left), 0.2))

        try:
            return await self._retrying(publish, retry_for, transient, delay=0.05, max_delay=0.5)
        except transient as err:
            raise _Unconfirmed(type(err).__name__) from None

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

    # -- the job plane: durable consumers on JOBS, job events on EVENTS ------------------------

    async def job_subscription(self, kind: str) -> Pull:
        """Bind to (creating if needed) the durable pull consumer shared by every runner of one
        job kind (`judge`, `train`); `contract.ContractMissing` when JOBS does not exist yet."""
        return await self.pull(contract.job_consumer(self.config, kind), kind)

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

    def open_outbox(self, stream_interval: float = 0.0) -> Outbox:
        """The token plane's sending side (`proto/outbox.py`): chunks to reply inboxes, one
        message per inbox per event-loop turn; sent and stopped when the bus closes."""
        outbox = Outbox(self.nc, stream_interval)
        self._outboxes.append(outbox)
        return outbox

    async def close_outboxes(self) -> None:
        for outbox in self._outboxes:
            await outbox.close()

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

    async def subscribe_cancels(self, on_cancel: Callable[[CancelMessage], Awaitable[None]]) -> Subscription:
        """Every cancel, decoded; a malformed one is logged and dropped."""
        return await self._subscribe(subjects.cancel_wildcard(), CancelMessage, on_cancel, logging.WARNING)

    async def subscribe_alive(self, on_alive: Callable[[AliveMessage], Awaitable[None]]) -> Subscription:
        """Every worker's liveness beats, decoded."""
        return await self._subscribe(subjects.alive_wildcard(), AliveMessage, on_alive, logging.DEBUG)

    async def subscribe_replies(self, gateway_id: str, on_chunks: Callable[[list[Chunk]], None]) -> Subscription:
        """The chunks workers send to this gateway's reply inbox, a batch at a time (`on_chunks`
        is called on the event loop and must not wait); a malformed batch is logged and dropped."""
        async def deliver(msg) -> None:
            try:
                chunks = decode_chunks(msg.data)
            except MessageError as err:
                log.warning("dropped a batch of chunks: %s", err)
                return
            on_chunks(chunks)

        return Subscription(await self.nc.subscribe(subjects.reply_inbox(gateway_id), cb=deliver))

    async def _subscribe(self, subject: str, model, handler, level: int) -> Subscription:
        async def deliver(msg) -> None:
            try:
                message = decode(model, msg.data)
            except MessageError as err:
                log.log(level, "ignored a malformed %s on %s: %s", model.__name__, msg.subject, err)
                return
            await handler(message)

        return Subscription(await self.nc.subscribe(subject, cb=deliver))

    async def put_card(self, card: WorkerCard, *, joining: bool = False) -> None:
        """Put (or refresh) a worker's card; `joining`: the first one, retried like the rest of
        joining while JetStream does not answer (a refresh that fails is simply tried again)."""
        registry = await self.registry_bucket()
        if joining:
            await self._joining(lambda: registry.put(card.worker_id, encode(card)), f"card {card.worker_id}")
        else:
            await registry.put(card.worker_id, encode(card))

    async def delete_card(self, worker_id: str) -> None:
        await (await self.registry_bucket()).delete(worker_id)


def connect_from_args(args, name: str, stop: asyncio.Event | None = None, *, role: str):
    """`connect` as a command's flags say: `--nats-url` (else $NATS_URL, else the local
    server; a command never starts a server of its own) and the credential flags."""
    from .auth import auth_from_args

    return connect(BusConfig.from_env(url=args.nats_url or DEFAULT_URL), name, stop, auth=auth_from_args(args),
                   role=role)


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
            try:
                yield await bus.setup(ensure=owner)
            finally:
                await bus.close_outboxes()
        finally:
            await close_connection(nc, watch)
        if lost:
            raise BusLost(f"the NATS connection was closed: {lost[0]}")
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
