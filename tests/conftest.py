"""Shared fixtures: a real nats-server on a free port, real `chatfabric` gateway and worker
processes, the real SmolLM2-135M-Instruct model, and the official `openai` SDK as the client."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.embedded import EmbeddedServer, free_port, port_is_free
from chatfabric.models.default_model import DEFAULT_MODEL_NAME, ensure_default_model

CHATFABRIC = str(Path(sys.executable).parent / "chatfabric")

# Short timers so failure paths (redelivery, expiry) resolve in seconds.
FAST_BUS_ENV = {
    "CHATFABRIC_ACK_WAIT": "3",
    "CHATFABRIC_REGISTRY_TTL": "3",
}


_RESTARTABLE_PORTS: set[int] = set()  # handed out in this session: never twice


def restartable_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a server that a test stops and
    starts again on the same port. A port from `free_port` lies inside that range: while its server
    is down, any socket given an ephemeral port (another listener on port 0, a connection's local
    port, such as one of the reconnecting clients' own) may take it, and the restart then fails
    with "address already in use" (as a cluster node's did once). The kernel hands out no port
    below the range on its own."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        port = random.randrange(max(1024, low - 16384), low)
        if port not in _RESTARTABLE_PORTS and port_is_free("127.0.0.1", port):
            _RESTARTABLE_PORTS.add(port)
            return port
    raise OSError(f"no free port below the ephemeral range (which starts at {low})")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Proc:
    """A `chatfabric` subprocess with its log in a file."""

    args: list[str]
    env: dict
    log_path: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Proc":
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [CHATFABRIC, *self.args], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


@dataclass
class Fabric:
    """One NATS server and the processes started on it."""

    server: EmbeddedServer
    model_dir: Path
    tmp: Path
    env: dict
    procs: list[Proc] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        return self.server.url

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> Proc:
        proc = Proc(args, {**self.env, **(env or {})}, self.tmp / f"{name}-{len(self.procs)}.log").start()
        self.procs.append(proc)
        return proc

    def gateway(self, *extra: str) -> tuple[Proc, str]:
        port = free_port()
        proc = self._spawn("gateway", ["gateway", "--port", str(port), "--nats-url", self.nats_url, *extra])
        base = f"http://127.0.0.1:{port}"

        def healthy():
            if proc.popen.poll() is not None:
                raise AssertionError(f"gateway exited:\n{proc.log()}")
            try:
                return http_json(f"{base}/health")["status"] == "ok"
            except OSError:
                return False

        wait_for(healthy, 30, "the gateway to be healthy")
        return proc, base

    def worker(self, model_name: str, *extra: str, env: dict | None = None) -> Proc:
        return self._spawn(
            "worker",
            ["worker", "--model-path", str(self.model_dir), "--model-name", model_name,
             "--nats-url", self.nats_url, *extra],
            env,
        )

    def wait_workers(self, base: str, model: str, count: int, timeout: float = 90) -> dict:
        def ready():
            for proc in self.procs:
                if proc.popen.poll() is not None and proc.popen.returncode not in (0, -9, -15):
                    raise AssertionError(f"process exited:\n{proc.log()}")
            models = {m["id"]: m for m in http_json(f"{base}/v1/models")["data"]}
            return models.get(model) if models.get(model, {}).get("workers") == count else None

        return wait_for(ready, timeout, f"{count} workers for {model}")

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.server.stop()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model, converted from its GGUF file once and cached."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def make_fabric(model_dir: Path, tmp: Path, **bus_env) -> Fabric:
    server = EmbeddedServer(port=restartable_port(), store_dir=tmp / "nats").start()
    env = {**os.environ, **FAST_BUS_ENV, **bus_env, "NATS_URL": server.url, "HF_HUB_OFFLINE": "1"}
    return Fabric(server=server, model_dir=model_dir, tmp=tmp, env=env)


@pytest.fixture(scope="session")
def fabric(model_dir, tmp_path_factory):
    """A NATS server shared by most tests (each test uses its own model names)."""
    fab = make_fabric(model_dir, tmp_path_factory.mktemp("fabric"))
    yield fab
    fab.close()


@pytest.fixture(scope="session")
def stack(fabric):
    """A gateway and one worker of the default model on the shared fabric."""
    _, base = fabric.gateway("--heartbeat-timeout", "5")
    fabric.worker(DEFAULT_MODEL_NAME, "--max-concurrency", "4")
    fabric.wait_workers(base, DEFAULT_MODEL_NAME, 1)
    return base


@pytest.fixture(scope="session")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def bus_of(fabric):
    """An async bus connection to the shared fabric, for tests that look at the registry."""

    def opener():
        return connect(BusConfig.from_env(url=fabric.nats_url, **{}), name="test")

    return opener


MODEL = DEFAULT_MODEL_NAME
