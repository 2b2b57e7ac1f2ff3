"""The settings of one fabric (`BusConfig`) and where a process looks for NATS when it is given
no URL: below the bus and the contract, which both read them."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class BusConfig:
    """Settings shared by every process on one fabric. `from_env` reads CHATFABRIC_* overrides.

    The settings below `url`, `store_dir`, `server_order` and `join_wait` shape the fabric's JetStream objects
    (`proto/contract.py`); a process that ensures the contract brings the server in line with
    them, so every such process of one fabric should be started with the same values."""

    url: str | None = None  # one server, or a cluster's nodes separated by commas
    store_dir: Path | None = None
    server_order: str = "random"  # which listed node to try first: random (NATS' default) or listed
    join_wait: float = 30.0  # seconds joining retries JetStream while it does not answer (a cluster electing leaders)
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
        for name in ("join_wait", "ack_wait", "registry_ttl", "request_max_age", "duplicate_window"):
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
