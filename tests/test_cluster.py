"""A real 3-node NATS cluster on loopback, from the shipped deploy/nats/cluster.conf, losing a node
under load.

Three nats-server processes (free ports, one store folder each, the shipped authorization with
fresh passwords) form one cluster; a gateway (`chatfabric gateway`, CHATFABRIC_REPLICAS=3, so
every stream of the contract is R3), two synthetic workers (`chatfabric worker --backend
synthetic`) and the arena's vote publisher (this test, as the `arena` user) each list all three
nodes but connect first to a chosen one (CHATFABRIC_SERVER_ORDER=listed): the gateway to nats-1,
the workers to nats-2 and nats-3, the vote publisher to nats-2.

The node killed is nats-1: the gateway's node, made the leader of GEN (where requests queue) and
of ARENA (where votes are stored) before the kill, so one `kill -9` costs the gateway its
connection and both streams their leader at once. While chat requests (four clients in a loop,
each request bounded) and votes (unique ids; one that JetStream did not confirm is published
again with the same id) keep going, the test checks that

- every request either succeeds or fails with an HTTP error carrying the OpenAI error envelope,
  and none takes longer than REQUEST_BOUND;
- requests succeed again within RECOVERY_BOUND of the kill;
- the votes in ARENA are exactly the acknowledged ones, each once;
- nats-1, restarted on the same ports and store, catches up: its copy of every stream (its own
  /jsz, not the leader's answer) reaches the last sequence the stream had when it came back,
  and once the load and the processes stop all three copies are equal.

It prints one `CLUSTER-FAILOVER {...}` line with the measurements (docs/deploy.md): requests
failed around the kill, seconds from the kill until requests succeed again, seconds from the
restart until the node has caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats.errors
import pytest
from nats.js.errors import APIError

from chatfabric.proto.auth import NatsAuth, password_env
from chatfabric.proto.bus import BusConfig, EventNotStored, connect
from chatfabric.proto.connection import server_urls
from chatfabric.proto.embedded import free_port
from chatfabric.proto.events import Vote
from chatfabric.proto.replay import replay

from conftest import FAST_BUS_ENV, Proc, restartable_port
from deploy_files import NATS_DIR, render_nats_config, role_passwords, start_nats

MODEL = "syn"
MAX_TOKENS = 8
CLIENTS = 4  # concurrent chat clients, each sending one request after the other
RETRY_PAUSE = 0.1  # a chat client's pause after a failed request (seconds)
VOTE_INTERVAL = 0.05  # the vote publisher's pace (seconds between votes)
REQUEST_TIMEOUT = 15.0  # the gateway's --request-timeout: the longest a request may queue and run
HEARTBEAT_TIMEOUT = 5.0  # the gateway's --heartbeat-timeout: silence on a started request
REQUEST_BOUND = REQUEST_TIMEOUT + 5.0  # no request may take longer than this, success or failure
RECOVERY_BOUND = 20.0  # seconds from the kill until requests succeed again
CATCH_UP_BOUND = 20.0  # seconds from the restart until the node's streams have caught up
STEADY = 10  # successes in a row (started after the last failure) that count as recovered
CHATFABRIC_ENV = re.compile(r"^(NATS_|CHATFABRIC_)")


# -- the cluster ---------------------------------------------------------------------------------


@dataclass
class Node:
    name: str  # nats-1, nats-2, nats-3: the names cluster.conf's routes use
    client: int
    route: int
    http: int
    folder: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    def monitor(self, endpoint: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/{endpoint}", timeout=2) as resp:
            return json.loads(resp.read())

    def streams(self) -> dict[str, dict]:
        """This node's own copy of each stream it holds: {name: state}, from its /jsz."""
        jsz = self.monitor("jsz?accounts=true&streams=true")
        return {s["name"]: s["state"] for account in jsz.get("account_details", [])
                for s in account.get("stream_detail", [])}


class Cluster:
    """Three nats-server processes, each from the shipped cluster.conf rendered for loopback."""

    def __init__(self, tmp: Path, passwords: dict[str, str]):
        self.tmp = tmp
        self.passwords = passwords
        self.nodes = [Node(f"nats-{i}", *(restartable_port() for _ in range(3)), tmp / f"nats-{i}") for i in (1, 2, 3)]

    def render(self, node: Node) -> Path:
        replacements = {
            "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{node.client}",
            "http_port: 8222": f"http: 127.0.0.1:{node.http}",
            '"/data/jetstream"': f'"{node.folder / "store"}"',
            "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{node.route}",
        }
        for other in self.nodes:
            replacements[f"nats-route://{other.name}:6222"] = f"nats-route://127.0.0.1:{other.route}"
        return render_nats_config(NATS_DIR / "cluster.conf", node.folder, replacements)

    def start(self, node: Node) -> None:
        env = {**os.environ, **self.passwords, "NATS_SERVER_NAME": node.name}
        node.proc = start_nats(self.render(node), env, node.folder / "nats-server.log")

    def kill(self, node: Node) -> None:
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)

    def urls(self, first: Node) -> str:
        """Every node, `first` first (with CHATFABRIC_SERVER_ORDER=listed it is tried first)."""
        i = self.nodes.index(first)
        return ",".join(n.url for n in self.nodes[i:] + self.nodes[:i])

    def formed(self, nodes: list[Node] | None = None) -> bool:
        """Every node (of `nodes`) up, agreeing on one JetStream meta leader that sees all of them
        current."""
        views = []
        for node in nodes or self.nodes:
            if node.proc.poll() is not None:
                raise AssertionError(f"{node.name} exited:\n{self.log(node)}")
            try:
                views.append(node.monitor("jsz"))
            except OSError:
                return False
        leaders = {v.get("meta_cluster", {}).get("leader") for v in views}
        if len(leaders) != 1 or None in leaders or "" in leaders:
            return False
        leader = next(n for n in self.nodes if n.name in leaders)
        meta = next(v for v, n in zip(views, nodes or self.nodes) if n is leader)["meta_cluster"]
        return meta.get("cluster_size") == 3 and all(r.get("current") for r in meta.get("replicas", []))

    def log(self, node: Node) -> str:
        return (node.folder / "nats-server.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(15)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()


async def until(predicate, timeout: float, what: str, interval: float = 0.05, explain=None):
    """Poll `predicate` (sync, or returning an awaitable) until it returns something true;
    `explain()` adds to the failure's message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f"\n{explain()}" if explain else ""))
        await asyncio.sleep(interval)


# -- the load --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float  # time.monotonic()
    ended: float
    status: int | None  # HTTP status; None: no HTTP answer at all
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Load:
    base: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)  # vote id -> ARENA sequence
    vote_retries: int = 0
    vote_latencies: list[float] = field(default_factory=list)

    async def chat(self, session: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}]}
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                async with session.post(f"{self.base}/v1/chat/completions", json=body) as resp:
                    payload = await resp.json(content_type=None)
                    if resp.status == 200:
                        assert payload["choices"][0]["message"]["content"] == " hello" * MAX_TOKENS, payload
                        detail = ""
                    else:  # a failure must say what it is, in the OpenAI error envelope
                        detail = f"{payload['error']['type']}/{payload['error'].get('code')}: {payload['error']['message']}"
                    self.outcomes.append(Outcome(started, time.monotonic(), resp.status, detail))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as err:
                self.outcomes.append(Outcome(started, time.monotonic(), None, f"{type(err).__name__}: {err}"))
            if not self.outcomes[-1].ok:
                await asyncio.sleep(RETRY_PAUSE)  # as a client backs off before trying again

    async def votes(self, bus) -> None:
        """One vote after another, each published until JetStream acknowledges it (the same id
        every time: the duplicate window stores it once however often it is sent)."""
        n = 0
        while not self.stop.is_set():
            n += 1
            vote = Vote(winner="model_a", model_a=MODEL, model_b="other", anonymous=True,
                        conversation_a=f"{n:032x}", conversation_b=f"{n:032x}")
            started = time.monotonic()
            while True:
                try:
                    ack = await bus.publish_event(vote, retry_for=2.0)
                    break
                except (EventNotStored, APIError, nats.errors.Error, asyncio.TimeoutError):
                    self.vote_retries += 1
                    if time.monotonic() - started > 30:
                        raise
            assert vote.id not in self.acked
            self.acked[vote.id] = ack.seq
            self.vote_latencies.append(time.monotonic() - started)
            await asyncio.sleep(VOTE_INTERVAL)  # the publisher's pace, not a wait for anything

    def timeline(self, since: float) -> str:
        return "\n".join(f"{o.started - since:+7.2f} s  {o.ended - o.started:6.2f} s  {o.status}  {o.detail[:150]}"
                         for o in sorted(self.outcomes, key=lambda o: o.started) if o.ended >= since)

    def successes_since(self, when: float) -> int:
        return sum(1 for o in self.outcomes if o.ok and o.started >= when)

    def recovered(self, kill: float) -> float | None:
        """When requests were served again after the kill: the end of the first success among
        requests started after both the kill and the last failure, once STEADY of them succeed."""
        last_failure = max((o.started for o in self.outcomes if not o.ok), default=kill)
        after = sorted((o for o in self.outcomes if o.started >= kill and o.started > last_failure),
                       key=lambda o: o.started)
        if len(after) < STEADY or not all(o.ok for o in after):
            return None
        return min(o.ended for o in after)


def process_env(passwords: dict[str, str], role: str, urls: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not CHATFABRIC_ENV.match(k)}
    return {**env, **FAST_BUS_ENV, "HF_HUB_OFFLINE": "1", "NATS_URL": urls, "NATS_USER": role,
            "NATS_PASSWORD": passwords[password_env(role)], "CHATFABRIC_REPLICAS": "3",
            "CHATFABRIC_SERVER_ORDER": "listed"}


async def stream_leaders(bus, names: list[str]) -> dict[str, str]:
    return {name: (await bus.js.stream_info(name)).cluster.leader for name in names}


async def lead(bus, stream: str, node: Node) -> None:
    """Make `node` the leader of `stream` (a stepdown that names the preferred successor)."""
    async def leader_is_node():
        info = await bus.js.stream_info(stream)
        if info.cluster.leader == node.name:
            return True
        if info.cluster.leader:
            request = json.dumps({"placement": {"preferred": node.name}}).encode()
            with contextlib.suppress(nats.errors.Error):
                await bus.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=2)
        return False

    await until(leader_is_node, 15, f"{node.name} to lead {stream}", interval=0.2)


def last_seqs(node: Node) -> dict[str, int]:
    return {name: state["last_seq"] for name, state in node.streams().items()}


# -- the tests -------------------------------------------------------------------------------------


def test_a_client_is_given_every_node(monkeypatch):
    assert server_urls("nats://a:4222, nats://b:4222,,nats://c:4222") == \
        ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert server_urls("nats://a:4222") == ["nats://a:4222"]
    monkeypatch.setenv("CHATFABRIC_SERVER_ORDER", "listed")
    assert BusConfig.from_env().server_order == "listed"
    assert BusConfig().server_order == "random"
    with pytest.raises(ValueError, match="server_order"):
        BusConfig(server_order="first")


@pytest.mark.timeout(180)
async def test_a_node_killed_under_load(tmp_path, model_dir):
    passwords = role_passwords()
    cluster = Cluster(tmp_path, passwords)
    n1, n2, n3 = cluster.nodes
    procs: list[Proc] = []
    admin = NatsAuth(user="admin", password=passwords[password_env("admin")])
    arena = NatsAuth(user="arena", password=passwords[password_env("arena")])
    try:
        begin = time.monotonic()
        for node in cluster.nodes:
            cluster.start(node)
        await until(lambda: asyncio.to_thread(cluster.formed), 30, "the cluster to form with a meta leader")

        gw_port = free_port()
        base = f"http://127.0.0.1:{gw_port}"
        gateway = Proc(["gateway", "--port", str(gw_port), "--request-timeout", str(REQUEST_TIMEOUT),
                        "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)],
                       process_env(passwords, "gateway", cluster.urls(n1)), tmp_path / "gateway.log").start()
        procs.append(gateway)

        async def gateway_up():
            assert gateway.popen.poll() is None, gateway.log()
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{base}/health") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await until(gateway_up, 30, "the gateway to be healthy", interval=0.2)
        for i, node in enumerate((n2, n3)):
            procs.append(Proc(["worker", "--backend", "synthetic", "--synthetic-delay", "0.01",
                               "--model-path", str(model_dir), "--model-name", MODEL, "--heartbeat-interval", "0.5"],
                              process_env(passwords, "worker", cluster.urls(node)),
                              tmp_path / f"worker-{i}.log").start())

        async def workers(count):
            for proc in procs:
                assert proc.popen.poll() is None, proc.log()
            async with aiohttp.ClientSession() as s, s.get(f"{base}/v1/models") as resp:
                models = {m["id"]: m for m in (await resp.json())["data"]}
            return models.get(MODEL, {}).get("workers") == count

        await until(lambda: workers(2), 60, "both workers in the registry", interval=0.2)

        async with connect(BusConfig(url=cluster.urls(n2), server_order="listed"), "test-arena", auth=arena,
                           role="arena") as vote_bus, \
                connect(BusConfig(url=cluster.urls(n3), server_order="listed"), "test-admin", auth=admin) as admin_bus:
            streams = sorted(n1.streams())
            assert {"GEN", "ARENA", "EVENTS", "JOBS", "KV_workers", "OBJ_models", "OBJ_judge"} <= set(streams), streams
            for name in streams:
                info = await admin_bus.js.stream_info(name)
                assert info.config.num_replicas == 3, (name, info.config.num_replicas)
            for name in ("GEN", "ARENA"):
                await lead(admin_bus, name, n1)
            assert vote_bus.nc.connected_url.port == n2.client
            assert admin_bus.nc.connected_url.port == n3.client
            ready = time.monotonic() - begin

            load = Load(base)
            timeout = aiohttp.ClientTimeout(total=REQUEST_BOUND + 10)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
                tasks = [asyncio.create_task(load.chat(session)) for _ in range(CLIENTS)]
                tasks.append(asyncio.create_task(load.votes(vote_bus)))
                try:
                    warm = time.monotonic()
                    await until(lambda: load.successes_since(warm) >= 20 and len(load.acked) >= 20, 30,
                                "the load to run")
                    assert all(o.ok for o in load.outcomes), [o.detail for o in load.outcomes if not o.ok]
                    leaders_before = await stream_leaders(admin_bus, streams)
                    in_flight_at_kill = len(load.outcomes)

                    kill = time.monotonic()
                    cluster.kill(n1)
                    back = await until(lambda: load.recovered(kill), RECOVERY_BOUND, "requests to succeed again",
                                       explain=lambda: load.timeline(kill))
                    recovery = back - kill

                    async def new_leaders():
                        try:
                            leaders = await stream_leaders(admin_bus, streams)
                        except (nats.errors.Error, APIError):
                            return None  # a stream without a leader does not answer yet
                        return leaders if all(v and v != n1.name for v in leaders.values()) else None

                    leaders_after = await until(new_leaders, 30, "every stream to have a leader again")
                    elected = time.monotonic() - kill

                    # nats-1 comes back on the same ports and store, under load, and catches up
                    missed = {name: (await admin_bus.js.stream_info(name)).state.last_seq for name in streams}
                    restart = time.monotonic()
                    cluster.start(n1)

                    def caught_up():
                        try:
                            seqs = last_seqs(n1)
                        except OSError:
                            return False
                        return all(seqs.get(name, -1) >= missed[name] for name in streams)

                    await until(lambda: asyncio.to_thread(caught_up), CATCH_UP_BOUND, "nats-1 to catch up")
                    catch_up = time.monotonic() - restart
                    await until(lambda: asyncio.to_thread(cluster.formed), 30, "nats-1 to rejoin the meta group")
                    after_restart = time.monotonic()
                    await until(lambda: load.successes_since(after_restart) >= STEADY, 30,
                                "requests after the restart")
                finally:
                    load.stop.set()
                    results = await asyncio.gather(*tasks, return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result

            # requests: each one ended within the bound, and each failure was a clean HTTP error
            durations = [o.ended - o.started for o in load.outcomes]
            failed = [o for o in load.outcomes if not o.ok]
            assert max(durations) < REQUEST_BOUND, max(durations)
            assert all(o.status is not None and o.status >= 400 for o in failed), [o.detail for o in failed]
            assert load.successes_since(back) >= STEADY

            # votes: ARENA holds exactly the acknowledged ones, each once
            stored = [item.message.id async for item in replay(vote_bus, Vote)]
            assert len(stored) == len(set(stored)), "a vote was stored twice"
            assert set(stored) == set(load.acked), (set(load.acked) - set(stored), set(stored) - set(load.acked))

            # once the load has stopped and the gateway and workers are gone (their registry
            # cards no longer change), the three copies of every stream are the same
            for proc in procs:
                proc.stop()
            final = {name: (await admin_bus.js.stream_info(name)).state.last_seq for name in streams}

            def all_equal():
                try:
                    return all(last_seqs(node) == final for node in cluster.nodes)
                except OSError:
                    return False

            await until(lambda: asyncio.to_thread(all_equal), 20, "every node's copy of every stream to match")

        numbers = {
            "requests": len(load.outcomes),
            "requests_failed": len(failed),
            "failures": sorted({f"{o.status} {o.detail}"[:120] for o in failed}),
            "recovery_s": round(recovery, 2),
            "catch_up_s": round(catch_up, 2),
            "all_streams_led_s": round(elected, 2),
            "votes": len(load.acked),
            "vote_retries": load.vote_retries,
            "vote_latency_max_s": round(max(load.vote_latencies), 2),
            "request_max_s": round(max(durations), 2),
            "request_p50_s": round(statistics.median(durations), 3),
            "requests_before_kill": in_flight_at_kill,
            "leaders_before": leaders_before,
            "leaders_after": leaders_after,
            "setup_s": round(ready, 1),
            "total_s": round(time.monotonic() - begin, 1),
        }
        print("CLUSTER-FAILOVER " + json.dumps(numbers))
    finally:
        for proc in procs:
            proc.stop()
        cluster.close()
