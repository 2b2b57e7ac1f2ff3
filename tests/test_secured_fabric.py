"""`chatfabric up --nats-host 0.0.0.0` never runs an open bus: it generates role credentials,
prints how a remote worker joins, and that worker, following the printed lines, serves through
the gateway; a client without credentials is refused. Synthetic backends keep it fast."""

from __future__ import annotations

import asyncio
import os
import re
import stat

import nats
import pytest
from openai import OpenAI

from chatfabric.proto.embedded import free_port
from conftest import Proc, http_json, wait_for


def test_up_beyond_loopback_generates_credentials_and_a_remote_worker_joins(tmp_path, model_dir):
    nats_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["HF_HUB_OFFLINE"] = "1"
    up = Proc(["up", "--backend", "synthetic", "--model-path", str(model_dir), "--model-name", "here",
               "--nats-host", "0.0.0.0", "--nats-port", str(nats_port), "--port", str(http_port),
               "--data-dir", str(tmp_path / "data"), "--no-arena"], env, tmp_path / "up.log").start()
    remote = None
    try:
        banner = wait_for(lambda: "export NATS_PASSWORD" in up.log() and up.log(), 60, "the banner")
        exports = dict(re.findall(r"export (NATS_\w+)=(\S+)", banner))
        assert exports["NATS_USER"] == "worker" and exports["NATS_PASSWORD"]
        creds = tmp_path / "data" / "nats" / "nats-credentials.json"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        # the printed URL names this host; the test joins over loopback
        exports["NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
        remote = Proc(["worker", "--backend", "synthetic", "--model-path", str(model_dir), "--model-name", "there"],
                      {**env, **exports}, tmp_path / "remote.log").start()
        base = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: {"here", "there"} <= {m["id"] for m in http_json(f"{base}/v1/models")["data"]}, 60,
                 "both workers in /v1/models")
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="there", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
        assert reply.usage.completion_tokens == 3 and reply.choices[0].message.content == " hello" * 3

        async def stranger():
            with pytest.raises(Exception, match="[Aa]uthorization"):
                await nats.connect(f"nats://127.0.0.1:{nats_port}", allow_reconnect=False, connect_timeout=5,
                                   max_reconnect_attempts=0)

        asyncio.run(stranger())
    finally:
        if remote is not None:
            assert remote.stop() == 0, remote.log()
        assert up.stop() == 0, up.log()


def test_up_says_when_it_joins_an_existing_fabric(fabric, tmp_path, model_dir):
    """With $NATS_URL set, `up` adds its gateway and worker to that fabric, and says so."""
    up = Proc(["up", "--backend", "synthetic", "--model-path", str(model_dir), "--model-name", "joined-up",
               "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), "--no-arena"], fabric.env,
              tmp_path / "up.log").start()
    try:
        banner = wait_for(lambda: "Press Ctrl-C" in up.log() and up.log(), 60, "the banner")
        assert f"joined the existing fabric at {fabric.nats_url} (from $NATS_URL)" in banner
        assert "instead of starting a NATS server" in banner
    finally:
        assert up.stop() == 0, up.log()
