"""A worker's settings (`WorkerConfig`, built by `worker/cli.py`), and its id on the bus."""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass, field


def new_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    model_name: str
    max_concurrency: int = 16
    heartbeat_interval: float = 1.0  # token-plane heartbeats and in_progress while prefilling
    shutdown_grace: float = 30.0  # seconds started requests get to finish on shutdown
    stream_interval: float = 0.02  # seconds a stream's later text may wait to join its next (proto/outbox.py)
    worker_id: str = field(default_factory=new_worker_id)

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model name must not be empty")
        if self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if self.heartbeat_interval <= 0 or self.shutdown_grace < 0:
            raise ValueError("heartbeat interval must be positive and shutdown grace not negative")
        if not 0 <= self.stream_interval <= 1:
            raise ValueError("--stream-interval-ms must be between 0 and 1000")
