"""Every JetStream object of the fabric, declared once as data.

`build_contract(config)` declares the streams (`GEN`, `ARENA`, `JOBS`, `EVENTS`), the `workers`
KV bucket and one object store per writer (`subjects.ARTIFACT_BUCKETS`) from a `BusConfig`;
`gen_consumer`, `job_consumer` and `leaderboard_consumer` declare the durable pull consumers.
`proto/reconcile.py: ensure(js, spec)` brings the server in line with a declaration; nothing is
ever left silently different from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Union

from nats.js import api

from . import subjects
from .bus_config import BusConfig
from .roles import LEADERBOARD_CONSUMER, kv_stream, obj_stream


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
        return f"{self.setting}{knob} is {show(self.server)} on the server, the contract wants {show(self.wanted)}"

    def change(self) -> str:
        knob = f" ({self.source})" if self.source else ""
        return f"{self.setting}{knob} changed from {show(self.server)} to {show(self.wanted)}"


def plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return sorted(plain(v) for v in value)
    return value


def show(value: object) -> str:
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


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


def build_contract(config: BusConfig) -> Contract:
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


def gen_consumer(config: BusConfig, model: str) -> ConsumerSpec:
    """The consumer shared by every worker of `model`."""
    return ConsumerSpec(subjects.GEN_STREAM, subjects.gen_consumer(model), subjects.gen_subject(model),
                        ack_wait=config.ack_wait, max_deliver=config.max_deliver, sources=_CONSUMER_SOURCES)


def job_consumer(config: BusConfig, kind: str) -> ConsumerSpec:
    """The consumer shared by every runner of one job kind (`judge`, `train`)."""
    subject = subjects.job_subject(kind)
    return ConsumerSpec(subjects.JOBS_STREAM, subjects.JOB_KINDS[kind][1], subject,
                        ack_wait=config.ack_wait, max_deliver=config.max_deliver, sources=_CONSUMER_SOURCES)


def leaderboard_consumer(config: BusConfig, start_seq: int | None = None) -> ConsumerSpec:
    """The leaderboard follower's consumer on ARENA (votes and conversations). `start_seq`
    applies only when it is created: one that exists resumes where it was acknowledged."""
    return ConsumerSpec(subjects.ARENA_STREAM, LEADERBOARD_CONSUMER, f"{subjects.ARENA_PREFIX}.>",
                        ack_wait=config.ack_wait, max_deliver=config.max_deliver, sources=_CONSUMER_SOURCES,
                        start_seq=start_seq)


def missing_stream(stream: str) -> ContractMissing:
    return ContractMissing(
        f"stream {stream} does not exist on this fabric: a gateway (or `chatfabric up`) creates the "
        "fabric's streams when it starts; start one first"
    )
