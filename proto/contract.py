"""Every JetStream object of the fabric, declared once as data, and how one is brought in line.

`build_contract(config)` declares the streams (`GEN`, `ARENA`, `JOBS`, `EVENTS`), the `workers`
KV bucket and one object store per writer (`subjects.ARTIFACT_BUCKETS`) from a `BusConfig`; `gen_consumer` and `job_consumer`
declare the durable pull consumers. `ensure(js, spec)` creates an object that is missing and
reconciles one that exists: a setting JetStream can change in place is updated (and logged), any
other difference is refused with a `ContractMismatch` that names the setting and both values.
Nothing is ever left silently different from its declaration.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Union

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError

from . import subjects
from .roles import LEADERBOARD_CONSUMER, kv_stream, obj_stream

if TYPE_CHECKING:
    from .bus import BusConfig

log = logging.getLogger(__name__)

# JetStream error codes
STREAM_NAME_IN_USE = 10058  # created concurrently with another configuration
STREAM_NOT_FOUND = 10059

# nats-py's KV buckets de-duplicate within 2 minutes, or within the TTL when it is shorter (the
# server refuses a window longer than the stream's max age).
KV_DUPLICATE_WINDOW = 120.0


class ContractMismatch(RuntimeError):
    """An object on the server differs from the contract in a way that cannot be fixed here."""


class ContractMissing(LookupError):
    """An object of the contract does not exist on the server (yet)."""


@dataclass(frozen=True)
class Difference:
    """One setting of one object that differs between the server and the contract."""

    setting: str  # the field of nats' StreamConfig / ConsumerConfig
    server: object
    wanted: object
    source: str | None = None  # the BusConfig field the contract's value comes from
    fixed: bool = False  # JetStream cannot change it in place

    def __str__(self) -> str:
        knob = f" (CHATFABRIC_{self.source.upper()})" if self.source else ""
        return f"{self.setting}{knob} is {_show(self.server)} on the server, the contract wants {_show(self.wanted)}"

    def change(self) -> str:
        knob = f" ({self.source})" if self.source else ""
        return f"{self.setting}{knob} changed from {_show(self.server)} to {_show(self.wanted)}"


# -- the specs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """A stream. `max_age` 0 keeps messages forever; `sources` maps a setting to the
    BusConfig field it comes from, so that a mismatch names what to change."""

    name: str
    subjects: tuple[str, ...]
    retention: api.RetentionPolicy
    storage: api.StorageType = api.StorageType.FILE
    replicas: int = 1
    max_age: float = 0.0
    max_msgs_per_subject: int = -1
    discard: api.DiscardPolicy = api.DiscardPolicy.OLD
    discard_new_per_subject: bool = False
    duplicate_window: float = 120.0
    sources: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"stream {self.name}"

    @property
    def stream(self) -> str:
        return self.name

    def config(self) -> api.StreamConfig:
        return api.StreamConfig(name=self.name, **self.settings())

    def settings(self) -> dict[str, object]:
        """What changes behaviour, by StreamConfig field name: what `ensure` compares."""
        return {
            "subjects": list(self.subjects),
            "retention": self.retention,
            "storage": self.storage,
            "num_replicas": self.replicas,
            "max_age": self.max_age,
            "max_msgs_per_subject": self.max_msgs_per_subject,
            "discard": self.discard,
            "discard_new_per_subject": self.discard_new_per_subject,
            "duplicate_window": self.duplicate_window,
        }


@dataclass(frozen=True)
class KeyValueSpec:
    """A KV bucket (stream `KV_<bucket>`): `ttl` 0 keeps keys forever; `limit_marker_ttl` makes
    the server place a delete marker when a key expires, so that watchers hear it."""

    bucket: str
    history: int = 1
    ttl: float = 0.0
    limit_marker_ttl: float | None = None
    storage: api.StorageType = api.StorageType.FILE
    replicas: int = 1
    sources: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"KV bucket {self.bucket}"

    @property
    def stream(self) -> str:
        return kv_stream(self.bucket)

    def settings(self) -> dict[str, object]:
        return {
            "storage": self.storage,
            "num_replicas": self.replicas,
            "max_age": self.ttl,
            "max_msgs_per_subject": self.history,
            "duplicate_window": min(KV_DUPLICATE_WINDOW, self.ttl) if self.ttl else KV_DUPLICATE_WINDOW,
            "subject_delete_marker_ttl": self.limit_marker_ttl,
        }


@dataclass(frozen=True)
class ObjectStoreSpec:
    """An object store (stream `OBJ_<bucket>`); `max_bytes` -1 is unbounded."""

    bucket: str
    storage: api.StorageType = api.StorageType.FILE
    replicas: int = 1
    max_bytes: int = -1
    sources: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"object store {self.bucket}"

    @property
    def stream(self) -> str:
        return obj_stream(self.bucket)

    def settings(self) -> dict[str, object]:
        return {"storage": self.storage, "num_replicas": self.replicas, "max_bytes": self.max_bytes}


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer with explicit acks, shared by every process that takes its work."""

    stream: str
    name: str
    filter_subject: str
    ack_wait: float
    max_deliver: int = -1
    max_waiting: int = 512
    sources: tuple[tuple[str, str], ...] = ()
    start_seq: int | None = None  # where a new consumer starts (default: the first message)

    @property
    def label(self) -> str:
        return f"consumer {self.name} on {self.stream}"

    def config(self) -> api.ConsumerConfig:
        config = api.ConsumerConfig(name=self.name, durable_name=self.name, **self.settings())
        if self.start_seq is not None:
            config = config.evolve(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.start_seq)
        return config

    def settings(self) -> dict[str, object]:
        return {
            "filter_subject": self.filter_subject,
            "ack_policy": api.AckPolicy.EXPLICIT,
            "ack_wait": self.ack_wait,
            "max_deliver": self.max_deliver,
            "max_waiting": self.max_waiting,
        }


StoreSpec = Union[StreamSpec, KeyValueSpec, ObjectStoreSpec]
Spec = Union[StoreSpec, ConsumerSpec]


@dataclass(frozen=True)
class Contract:
    """Every stream, bucket and object store of one fabric."""

    gen: StreamSpec
    registry: KeyValueSpec
    arena: StreamSpec
    jobs: StreamSpec
    events: StreamSpec
    artifacts: tuple[ObjectStoreSpec, ...]

    def specs(self) -> tuple[StoreSpec, ...]:
        return (self.gen, self.registry, self.arena, self.jobs, self.events, *self.artifacts)


_EVERY_STREAM = (("num_replicas", "replicas"), ("duplicate_window", "duplicate_window"))


def build_contract(config: "BusConfig") -> Contract:
    """The fabric's objects as `config` declares them."""
    stream = dict(replicas=config.replicas, duplicate_window=config.duplicate_window)
    return Contract(
        gen=StreamSpec(
            subjects.GEN_STREAM, (f"{subjects.GEN_PREFIX}.>",), api.RetentionPolicy.WORK_QUEUE, **stream,
            # a full queue refuses the publish (the gateway's 429) instead of dropping a request
            discard=api.DiscardPolicy.NEW, discard_new_per_subject=True,
            max_msgs_per_subject=config.queue_limit, max_age=config.request_max_age,
            sources=(("max_msgs_per_subject", "queue_limit"), ("max_age", "request_max_age"), *_EVERY_STREAM),
        ),
        registry=KeyValueSpec(
            subjects.REGISTRY_BUCKET, history=1, ttl=config.registry_ttl, replicas=config.replicas,
            limit_marker_ttl=max(config.registry_ttl, 1.0),
            sources=(("max_age", "registry_ttl"), ("subject_delete_marker_ttl", "registry_ttl"),
                     ("duplicate_window", "registry_ttl"), ("num_replicas", "replicas")),
        ),
        arena=StreamSpec(
            subjects.ARENA_STREAM, (f"{subjects.ARENA_PREFIX}.>",), api.RetentionPolicy.LIMITS, **stream,
            max_age=config.arena_max_age, sources=(("max_age", "arena_max_age"), *_EVERY_STREAM),
        ),
        jobs=StreamSpec(
            subjects.JOBS_STREAM, tuple(subject for subject, _ in subjects.JOB_KINDS.values()),
            api.RetentionPolicy.WORK_QUEUE, **stream, sources=_EVERY_STREAM,
        ),
        events=StreamSpec(
            subjects.EVENTS_STREAM, (f"{subjects.EVENTS_PREFIX}.>",), api.RetentionPolicy.LIMITS, **stream,
            max_age=config.events_max_age, sources=(("max_age", "events_max_age"), *_EVERY_STREAM),
        ),
        artifacts=tuple(ObjectStoreSpec(bucket, replicas=config.replicas, sources=(("num_replicas", "replicas"),))
                        for bucket in subjects.ARTIFACT_BUCKETS),
    )


_CONSUMER_SOURCES = (("ack_wait", "ack_wait"), ("max_deliver", "max_deliver"))


def gen_consumer(config: "BusConfig", model: str) -> ConsumerSpec:
    """The consumer shared by every worker of `model`."""
    return ConsumerSpec(subjects.GEN_STREAM, subjects.gen_consumer(model), subjects.gen_subject(model),
                        ack_wait=config.ack_wait, max_deliver=config.max_deliver, sources=_CONSUMER_SOURCES)


def job_consumer(config: "BusConfig", kind: str) -> ConsumerSpec:
    """The consumer shared by every runner of one job kind (`judge`, `train`)."""
    subject = subjects.job_subject(kind)
    return ConsumerSpec(subjects.JOBS_STREAM, subjects.JOB_KINDS[kind][1], subject,
                        ack_wait=config.ack_wait, max_deliver=config.max_deliver, sources=_CONSUMER_SOURCES)


def leaderboard_consumer(config: "BusConfig", start_seq: int | None = None) -> ConsumerSpec:
    """The leaderboard follower's consumer on ARENA (votes and conversations). `start_seq`
    applies only when it is created: one that exists resumes where it was acknowledged."""
    return ConsumerSpec(subjects.ARENA_STREAM, LEADERBOARD_CONSUMER, f"{subjects.ARENA_PREFIX}.>",
                        ack_wait=config.ack_wait, max_deliver=config.max_deliver, sources=_CONSUMER_SOURCES,
                        start_seq=start_seq)


# -- comparing ---------------------------------------------------------------------------------


def _plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return sorted(_plain(v) for v in value)
    return value


def _show(value: object) -> str:
    value = _plain(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _same(server: object, wanted: object) -> bool:
    server, wanted = _plain(server), _plain(wanted)
    if isinstance(server, (int, float)) and isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        return math.isclose(server, wanted, rel_tol=1e-9, abs_tol=1e-6)
    return server == wanted


def _fixed(setting: str, server: object, wanted: object) -> bool:
    """What JetStream refuses to change in place (checked against nats-server 2.15)."""
    if setting in ("storage", "ack_policy", "max_waiting"):
        return True
    workqueue = api.RetentionPolicy.WORK_QUEUE.value
    return setting == "retention" and workqueue in (_plain(server), _plain(wanted))


def differences(spec: Spec, server: api.StreamConfig | api.ConsumerConfig) -> list[Difference]:
    """The settings of `spec` that `server` (the object's configuration as the server reports
    it) does not have. A value the server leaves unset counts as JetStream's default."""
    sources = dict(spec.sources)
    found = []
    for setting, wanted in spec.settings().items():
        have = getattr(server, setting)
        if have is None and setting in ("max_age", "max_bytes"):
            have = 0.0 if setting == "max_age" else -1
        if not _same(have, wanted):
            found.append(Difference(setting, have, wanted, sources.get(setting), _fixed(setting, have, wanted)))
    return found


def mismatch(spec: Spec, found: list[Difference], reason: str) -> ContractMismatch:
    what = "; ".join(str(d) for d in found)
    remedy = ("delete it (every message in it is lost) and start again, or start this process with the "
              "fabric's settings" if isinstance(spec, (StreamSpec, KeyValueSpec, ObjectStoreSpec))
              else "delete the consumer (its workers then recreate it), or start this process with the fabric's settings")
    return ContractMismatch(f"{spec.label}: {what}; {reason}: {remedy}")


# -- ensuring ----------------------------------------------------------------------------------


async def ensure(js: JetStreamContext, spec: Spec) -> None:
    """Create `spec`'s object, or bring the existing one in line with it (see the module doc).
    Safe to run from several processes at once: JetStream makes creating the same object twice
    a no-op, and a concurrent creation with other settings is reconciled like any mismatch."""
    if isinstance(spec, ConsumerSpec):
        await _ensure_consumer(js, spec)
        return
    try:
        server = (await js.stream_info(spec.stream)).config
    except NotFoundError:
        server = await _create(js, spec)
        if server is None:
            return
    await _reconcile(js, spec, server)


async def _create(js: JetStreamContext, spec: StoreSpec) -> api.StreamConfig | None:
    """Create the object; None when it now exists as declared, else what another process made."""
    try:
        if isinstance(spec, StreamSpec):
            await js.add_stream(spec.config())
        elif isinstance(spec, KeyValueSpec):
            await js.create_key_value(bucket=spec.bucket, history=spec.history, ttl=spec.ttl or None,
                                      storage=spec.storage, replicas=spec.replicas,
                                      limit_marker_ttl=spec.limit_marker_ttl)
        else:
            await js.create_object_store(spec.bucket, storage=spec.storage, replicas=spec.replicas,
                                         max_bytes=spec.max_bytes)
    except BadRequestError as err:
        if err.err_code != STREAM_NAME_IN_USE:
            raise
        return (await js.stream_info(spec.stream)).config
    log.info("created %s", spec.label)
    return None


async def _reconcile(js: JetStreamContext, spec: StoreSpec, server: api.StreamConfig) -> None:
    found = differences(spec, server)
    if not found:
        return
    fixed = [d for d in found if d.fixed]
    if fixed:
        raise mismatch(spec, fixed, "JetStream cannot change that in place")
    try:
        await js.update_stream(server.evolve(**{d.setting: d.wanted for d in found}))
    except APIError as err:
        raise mismatch(spec, found, f"JetStream refused the update ({err.description})") from None
    for d in found:
        log.warning("%s: %s", spec.label, d.change())


async def _ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    try:
        server = (await js.consumer_info(spec.stream, spec.name)).config
    except NotFoundError as err:
        if err.err_code == STREAM_NOT_FOUND:
            raise missing_stream(spec.stream) from None
        server = None
    found = differences(spec, server) if server is not None else []
    fixed = [d for d in found if d.fixed]
    if fixed:
        raise mismatch(spec, fixed, "JetStream cannot change that in place")
    if server is not None and not found:
        return
    try:
        # creating a consumer that exists updates what may change and refuses the rest
        await js.add_consumer(spec.stream, config=spec.config())
    except NotFoundError:
        raise missing_stream(spec.stream) from None
    except APIError as err:
        raise mismatch(spec, found, f"JetStream refused the update ({err.description})") from None
    for d in found:
        log.warning("%s: %s", spec.label, d.change())


def missing_stream(stream: str) -> ContractMissing:
    return ContractMissing(
        f"stream {stream} does not exist on this fabric: a gateway (or `chatfabric up`) creates the "
        "fabric's streams when it starts; start one first"
    )
