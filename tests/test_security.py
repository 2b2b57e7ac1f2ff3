"""The bus closed to strangers: every role's permissions against a real nats-server.

One server runs with the rendered authorization block. For each role, what it needs works (the
real `Bus` code paths where they exist) and what it must not do is refused. nats-py reports a
refused publish or subscribe asynchronously through `error_cb`, and a refused JetStream API call
simply gets no answer; `Peer.refused` waits for the server's "permissions violation" error
instead (each arrives within milliseconds; the timeout only bounds a failure).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.js import api

from chatfabric.proto import auth, roles, subjects
from chatfabric.proto.bus import Bus, BusConfig, connect
from chatfabric.proto.embedded import EmbeddedServer, find_nats_server, free_port
from chatfabric.proto.events import JobProgress, Vote
from chatfabric.proto.replay import replay

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "m-sec"
REFUSAL_TIMEOUT = 3.0


@dataclass
class Peer:
    """A connection as one role that records the server's permission violations."""

    nc: NATS
    violations: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def js(self):
        return self.nc.jetstream(timeout=REFUSAL_TIMEOUT)

    async def on_error(self, err: Exception) -> None:
        self.violations.append(str(err))
        self.changed.set()

    async def refused(self, kind: str, subject: str) -> None:
        """Wait until the server refused a publish or subscription to exactly `subject`."""
        wanted = f'permissions violation for {kind} to "{subject}"'.lower()
        async with asyncio.timeout(REFUSAL_TIMEOUT):
            while not any(wanted in v.lower() for v in self.violations):
                self.changed.clear()
                await self.changed.wait()

    async def refused_call(self, call, subject: str) -> None:
        """Run a JetStream call that publishes to `subject` and expect the publish refused;
        the call itself would only time out, so it is cancelled once the refusal arrived."""
        task = asyncio.ensure_future(call)
        try:
            await self.refused("publish", subject)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def assert_clean(self) -> None:
        """No refusal so far: the server answers a flush after every earlier command."""
        await self.nc.flush()
        assert not self.violations, self.violations


@pytest.fixture(scope="module")
def passwords(tmp_path_factory) -> dict[str, str]:
    return auth.ensure_credentials(tmp_path_factory.mktemp("credentials"))


@pytest.fixture(scope="module")
def server(passwords, tmp_path_factory):
    srv = EmbeddedServer(
        port=free_port(),
        store_dir=tmp_path_factory.mktemp("secured") / "nats",
        authorization=auth.render_authorization(passwords),
    ).start()
    yield srv
    srv.stop()


@pytest_asyncio.fixture
async def join(server, passwords):
    """join(role) -> a Peer connected with the role's user, password and inbox prefix."""
    peers: list[Peer] = []

    async def opener(role: str) -> Peer:
        peer = Peer(nc=NATS())
        options = auth.NatsAuth.for_role(role, passwords).connect_options(role)
        await peer.nc.connect(server.url, error_cb=peer.on_error, allow_reconnect=False, **options)
        peers.append(peer)
        return peer

    yield opener
    for peer in peers:
        await peer.nc.close()


@pytest_asyncio.fixture(scope="module")
async def planes(server, passwords):
    """The gateway ensures the whole contract, as `Bus.setup` does when it starts."""
    options = auth.NatsAuth.for_role("gateway", passwords).connect_options("gateway")
    gateway = await nats.connect(server.url, **options)
    await Bus(gateway, BusConfig()).setup()
    yield
    await gateway.close()


# -- strangers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("credentials", [
    {},
    {"user": "worker", "password": "not-the-password"},
    {"user": "nobody", "password": "x"},
    {"token": "guess"},
], ids=["none", "wrong-password", "unknown-user", "token"])
async def test_a_stranger_cannot_connect(server, credentials):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=2, **credentials)


async def test_a_role_cannot_log_in_with_another_roles_password(server, passwords):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(server.url, allow_reconnect=False, user="admin", password=passwords["worker"])


# -- the request, token and control planes ---------------------------------------------------------


async def take(bus: Bus, n: int) -> list:
    """`n` deliveries of the model's requests, pulled as a worker pulls them (its role's inbox)."""
    pull, stop, taken = await bus.ensure_consumer(MODEL), asyncio.Event(), []
    async with asyncio.timeout(5):
        async for batch in pull.batches(stop, lambda: n - len(taken), 0.5):
            taken.extend(batch)
            if len(taken) == n:
                stop.set()
    return taken


async def test_gateway_and_worker_serve_a_request(planes, join):
    gateway, worker = await join("gateway"), await join("worker")
    gw_bus, wk_bus = Bus(gateway.nc, BusConfig()), Bus(worker.nc, BusConfig())
    await wk_bus.setup(ensure=False)  # binds to what the gateway created
    await gw_bus.setup()

    chunks, alive, cancels = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    await gateway.nc.subscribe(subjects.reply_inbox("g1"), cb=chunks.put)
    await gateway.nc.subscribe(f"{subjects.ALIVE_PREFIX}.*", cb=alive.put)
    await worker.nc.subscribe(subjects.cancel_wildcard(), cb=cancels.put)
    watcher = await (await gw_bus.registry_bucket()).watchall()

    await (await wk_bus.ensure_consumer(MODEL)).unsubscribe()  # the consumer, created by the worker
    assert await gw_bus.model_was_served(MODEL)
    await gateway.js.publish(subjects.gen_subject(MODEL), b"request r1", headers={"Nats-Msg-Id": "r1"})
    await gateway.js.publish(subjects.gen_subject(MODEL), b"request r2", headers={"Nats-Msg-Id": "r2"})
    first, second = await take(wk_bus, 2)
    await first.in_progress()
    await first.ack()
    # the worker dies before starting r2: the gateway hands it back with the ack subject the
    # worker's heartbeat carried, and JetStream redelivers it at once
    assert await gw_bus.hand_back(second.ack_subject)
    (again,) = await take(wk_bus, 1)
    assert again.data == b"request r2" and again.delivered == 2
    await again.term()

    await worker.nc.publish(subjects.reply_inbox("g1"), b"delta")
    await worker.nc.publish(f"{subjects.ALIVE_PREFIX}.w1", b"alive")
    await gateway.nc.publish(subjects.cancel_subject("r1"), b"cancel")
    registry = await wk_bus.registry_bucket()
    await registry.put("w1", b"card")
    await registry.delete("w1")

    async with asyncio.timeout(5):
        assert (await chunks.get()).subject == subjects.reply_inbox("g1")
        assert (await alive.get()).data == b"alive"
        assert (await cancels.get()).subject == subjects.cancel_subject("r1")
        seen = []
        while len(seen) < 2:
            entry = await watcher.updates(timeout=5)
            if entry is not None:
                seen.append((entry.key, entry.operation))
    assert seen == [("w1", None), ("w1", "DEL")]
    info = await gateway.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(MODEL))
    assert info.num_ack_pending == 0
    await watcher.stop()
    await worker.assert_clean()
    await gateway.assert_clean()


def _pub(subject):
    return lambda peer: _publish_refused(peer, subject)


def _sub(subject):
    return lambda peer: _subscribe_refused(peer, subject)


def _api(make_call, subject):
    return lambda peer: peer.refused_call(make_call(peer.js), subject)


async def _publish_refused(peer: Peer, subject: str) -> None:
    await peer.nc.publish(subject, b"x")
    await peer.refused("publish", subject)


async def _subscribe_refused(peer: Peer, subject: str) -> None:
    await peer.nc.subscribe(subject)
    await peer.refused("subscription", subject)


GEN, REGISTRY = subjects.GEN_STREAM, roles.kv_stream(subjects.REGISTRY_BUCKET)

WORKER_REFUSED = {
    "core-subscribe to every request": _sub("gen.>"),
    "read the gateways' token streams": _sub(f"{subjects.INBOX_PREFIX}.>"),
    "read a gateway's JetStream replies": _sub("_INBOX_gateway.>"),
    "forge a JetStream reply to a gateway": _pub("_INBOX_gateway.abc.def"),
    "cancel a request": _pub(subjects.cancel_subject("x")),
    "vote": _pub("arena.vote.x"),
    "inject a request": _pub(subjects.gen_subject(MODEL)),
    "submit a train job": _pub(subjects.TRAIN_JOBS),
    "write a model": _pub(f"$O.{subjects.MODELS_BUCKET}.M.x"),
    "read the judge's records": _api(lambda js: js.object_store(subjects.JUDGE_BUCKET),
                                     f"$JS.API.STREAM.INFO.{roles.obj_stream(subjects.JUDGE_BUCKET)}"),
    "read training data": _api(lambda js: js.object_store(subjects.TRAINING_BUCKET),
                               f"$JS.API.STREAM.INFO.{roles.obj_stream(subjects.TRAINING_BUCKET)}"),
    "delete the GEN stream": _api(lambda js: js.delete_stream(GEN), f"$JS.API.STREAM.DELETE.{GEN}"),
    "purge the registry": _api(lambda js: js.purge_stream(REGISTRY), f"$JS.API.STREAM.PURGE.{REGISTRY}"),
    "create a stream": _api(lambda js: js.add_stream(name="MINE", subjects=["mine.>"]), "$JS.API.STREAM.CREATE.MINE"),
    "delete a model's consumer": _api(lambda js: js.delete_consumer(GEN, subjects.gen_consumer(MODEL)),
                                      f"$JS.API.CONSUMER.DELETE.{GEN}.{subjects.gen_consumer(MODEL)}"),
    "read other workers' cards": _api(lambda js: js.get_msg(REGISTRY, seq=1), f"$JS.API.STREAM.MSG.GET.{REGISTRY}"),
}


@pytest.mark.parametrize("action", WORKER_REFUSED.values(), ids=WORKER_REFUSED.keys())
async def test_worker_is_refused(planes, join, action):
    await action(await join("worker"))


GATEWAY_REFUSED = {
    "core-subscribe to every request": _sub("gen.>"),
    "write into a token stream": _pub(subjects.reply_inbox("g2")),
    "announce a fake worker": _pub(f"{subjects.ALIVE_PREFIX}.w1"),
    "register a fake worker card": _pub(f"$KV.{subjects.REGISTRY_BUCKET}.w1"),
    "submit a train job": _pub(subjects.TRAIN_JOBS),
    "create a consumer on GEN": _api(lambda js: js.pull_subscribe(subjects.gen_subject(MODEL), durable="gw", stream=GEN),
                                     f"$JS.API.CONSUMER.CREATE.{GEN}.gw.{subjects.gen_subject(MODEL)}"),
    "pull a model's requests": _pub(f"$JS.API.CONSUMER.MSG.NEXT.{GEN}.{subjects.gen_consumer(MODEL)}"),
    "delete the GEN stream": _api(lambda js: js.delete_stream(GEN), f"$JS.API.STREAM.DELETE.{GEN}"),
    "purge the GEN stream": _api(lambda js: js.purge_stream(GEN), f"$JS.API.STREAM.PURGE.{GEN}"),
    "delete the votes": _api(lambda js: js.delete_stream(subjects.ARENA_STREAM),
                             f"$JS.API.STREAM.DELETE.{subjects.ARENA_STREAM}"),
    "purge the votes": _api(lambda js: js.purge_stream(subjects.ARENA_STREAM),
                            f"$JS.API.STREAM.PURGE.{subjects.ARENA_STREAM}"),
    "create a stream outside the contract": _api(lambda js: js.add_stream(name="MINE", subjects=["mine.>"]),
                                                 "$JS.API.STREAM.CREATE.MINE"),
    "update a stream outside the contract": _api(lambda js: js.update_stream(name="MINE", subjects=["mine.>"]),
                                                 "$JS.API.STREAM.UPDATE.MINE"),
    "vote": _pub(subjects.vote_subject(True)),
}


@pytest.mark.parametrize("action", GATEWAY_REFUSED.values(), ids=GATEWAY_REFUSED.keys())
async def test_gateway_is_refused(planes, join, action):
    await action(await join("gateway"))


async def test_the_gateway_ensures_the_contract_and_raises_a_limit(planes, join):
    gateway, admin = await join("gateway"), await join("admin")
    await Bus(gateway.nc, BusConfig(queue_limit=300)).setup()
    assert (await admin.js.stream_info(GEN)).config.max_msgs_per_subject == 300
    await Bus(gateway.nc, BusConfig()).setup()  # and back, for the other tests
    assert (await admin.js.stream_info(GEN)).config.max_msgs_per_subject == 256
    await gateway.assert_clean()


async def test_a_workers_consumer_filter_is_pinned_by_the_create_subject(planes, join):
    """The server refuses a create whose body's filter differs from the subject's: a worker
    allowed `CONSUMER.CREATE.GEN.*.gen.*` cannot hide a wider filter in the body."""
    worker = await join("worker")
    body = {"stream_name": GEN, "config": {"name": "sneaky", "filter_subject": "gen.>", "ack_policy": "explicit"}}
    reply = await worker.nc.request(f"$JS.API.CONSUMER.CREATE.{GEN}.sneaky.gen.other",
                                    json.dumps(body).encode(), timeout=5)
    assert "did not match filtered subject" in json.loads(reply.data)["error"]["description"]


# -- the event plane ------------------------------------------------------------------------------


async def test_arena_records_votes_replays_them_and_submits_judge_jobs(planes, join):
    arena = await join("arena")
    await arena.js.publish(f"{subjects.ARENA_PREFIX}.vote.b1", b"vote", headers={"Nats-Msg-Id": "b1"})
    await arena.js.publish(subjects.JUDGE_JOBS, b"judge this", headers={"Nats-Msg-Id": "j-arena"})
    replay = await arena.js.subscribe(f"{subjects.ARENA_PREFIX}.>", ordered_consumer=True,
                                      deliver_policy=api.DeliverPolicy.ALL)
    msg = await replay.next_msg(timeout=5)
    assert msg.data == b"vote"
    await replay.unsubscribe()
    await arena.assert_clean()


async def test_arena_publishes_and_replays_votes_through_the_bus(planes, join):
    arena = await join("arena")
    bus = Bus(arena.nc, BusConfig())
    cast = Vote(id="sec-vote", winner="tie", model_a="a", model_b="b", anonymous=True,
                conversation_a="ca", conversation_b="cb")
    ack = await bus.publish_event(cast)
    assert [item.message.id async for item in replay(bus, Vote, start_seq=ack.seq)] == [cast.id]
    await arena.assert_clean()


async def test_job_runners_publish_events_and_artifacts_through_the_bus(planes, join):
    judge, trainer, arena, worker = await join("judge"), await join("trainer"), await join("arena"), await join("worker")
    bus = Bus(judge.nc, BusConfig())
    await bus.publish_event(JobProgress(job_id="sec-job", kind="judge", done=1, total=2))
    ref = await bus.put_artifact(subjects.JUDGE_BUCKET, "sec-results.json", b"{}")
    assert await Bus(arena.nc, BusConfig()).get_artifact(ref) == b"{}"  # `judge run` reads the results
    model = await Bus(trainer.nc, BusConfig()).put_artifact(subjects.MODELS_BUCKET, "models/sec.tar", b"tar")
    assert await Bus(worker.nc, BusConfig()).get_artifact(model) == b"tar"  # a worker serves artifact://sec
    for peer in (judge, trainer, arena, worker):
        await peer.assert_clean()


@pytest.mark.parametrize("role_name", ["worker", "arena", "leaderboard", "judge", "trainer"])
async def test_every_component_opens_the_bus_under_its_own_role(planes, server, passwords, role_name):
    """What each component's `run` does: `connect` with its role binds the contract, no more."""
    async with connect(BusConfig(url=server.url), f"test-{role_name}", auth=auth.NatsAuth.for_role(role_name, passwords),
                       role=role_name) as bus:
        assert bus.connected


ARENA_REFUSED = {
    "publish a request around the gateway": _pub(subjects.gen_subject(MODEL)),
    "submit a train job": _pub(subjects.TRAIN_JOBS),
    "publish job results": _pub(f"{subjects.EVENTS_PREFIX}.judge.x"),
    "take judge jobs": _api(lambda js: js.pull_subscribe(subjects.JUDGE_JOBS, durable=subjects.JUDGE_CONSUMER,
                                                         stream=subjects.JOBS_STREAM),
                            f"$JS.API.CONSUMER.INFO.{subjects.JOBS_STREAM}.{subjects.JUDGE_CONSUMER}"),
    "write a judge's record": _pub(f"$O.{subjects.JUDGE_BUCKET}.C.x"),
    "replace the leaderboard's snapshot": _pub(f"$O.{subjects.LEADERBOARD_BUCKET}.M.x"),
    "purge the published models": _api(lambda js: js.purge_stream(roles.obj_stream(subjects.MODELS_BUCKET)),
                                       f"$JS.API.STREAM.PURGE.{roles.obj_stream(subjects.MODELS_BUCKET)}"),
}


@pytest.mark.parametrize("action", ARENA_REFUSED.values(), ids=ARENA_REFUSED.keys())
async def test_arena_is_refused(planes, join, action):
    await action(await join("arena"))


JOB_ROLES = {
    "judge": (subjects.JUDGE_CONSUMER, subjects.JUDGE_JOBS, subjects.TRAIN_CONSUMER, subjects.TRAIN_JOBS),
    "trainer": (subjects.TRAIN_CONSUMER, subjects.TRAIN_JOBS, subjects.JUDGE_CONSUMER, subjects.JUDGE_JOBS),
}
# each writer's own object store, and the role that reads what it writes there
OWN_BUCKET = {"judge": (subjects.JUDGE_BUCKET, "arena"), "trainer": (subjects.MODELS_BUCKET, "worker"),
              "leaderboard": (subjects.LEADERBOARD_BUCKET, "arena")}
OWNERS = {subjects.MODELS_BUCKET: "trainer", subjects.TRAINING_BUCKET: "trainer", subjects.JUDGE_BUCKET: "judge",
          subjects.LEADERBOARD_BUCKET: "leaderboard"}


@pytest.mark.parametrize("role_name", JOB_ROLES)
async def test_job_runner_takes_its_jobs_and_publishes_results(planes, join, role_name):
    consumer, jobs, _, _ = JOB_ROLES[role_name]
    admin, runner, worker = await join("admin"), await join(role_name), await join("worker")
    await admin.js.publish(jobs, b"job", headers={"Nats-Msg-Id": f"job-{role_name}"})
    psub = await runner.js.pull_subscribe(jobs, durable=consumer, stream=subjects.JOBS_STREAM)
    [job] = await psub.fetch(1, timeout=5)
    await job.in_progress()
    await job.ack()
    await runner.js.publish(f"{subjects.EVENTS_PREFIX}.{role_name}.done", b"result")
    for peer in (runner, worker):
        await peer.assert_clean()


@pytest.mark.parametrize("role_name", OWN_BUCKET)
async def test_a_writer_replaces_and_deletes_its_own_objects_and_its_readers_read_them(planes, join, role_name):
    bucket, reader_role = OWN_BUCKET[role_name]
    writer, reader = await join(role_name), await join(reader_role)
    store = await writer.js.object_store(bucket)
    payload = os.urandom(1 << 20)
    await store.put(f"{role_name}.bin", payload)
    await store.put(f"{role_name}.bin", payload[:1000])  # a replacement purges the old chunks
    read = await (await reader.js.object_store(bucket)).get(f"{role_name}.bin")
    assert read.data == payload[:1000]
    await store.delete(f"{role_name}.bin")
    for peer in (writer, reader):
        await peer.assert_clean()


OTHERS_OBJECTS = [(role_name, bucket) for role_name in ("judge", "trainer", "leaderboard")
                  for bucket, owner in OWNERS.items() if owner != role_name]


@pytest.mark.parametrize("role_name,bucket", OTHERS_OBJECTS, ids=[f"{r}-{b}" for r, b in OTHERS_OBJECTS])
async def test_no_role_can_replace_delete_or_purge_another_roles_objects(planes, join, role_name, bucket):
    """Least privilege to the object: an owner's object survives every other writer."""
    owner, intruder = await join(OWNERS[bucket]), await join(role_name)
    await (await owner.js.object_store(bucket)).put("precious.bin", b"keep me")
    stream = roles.obj_stream(bucket)
    await intruder.refused_call(intruder.js.purge_stream(stream), f"$JS.API.STREAM.PURGE.{stream}")
    for plane in ("M", "C"):
        await intruder.nc.publish(f"$O.{bucket}.{plane}.x", b"x")
        await intruder.refused("publish", f"$O.{bucket}.{plane}.x")
    kept = await (await owner.js.object_store(bucket)).get("precious.bin")
    assert kept.data == b"keep me"
    await owner.assert_clean()


@pytest.mark.parametrize("role_name", JOB_ROLES)
async def test_job_runner_cannot_take_the_others_jobs(planes, join, role_name):
    consumer, _, other_consumer, other_jobs = JOB_ROLES[role_name]
    runner = await join(role_name)
    await runner.refused_call(
        runner.js.add_consumer(subjects.JOBS_STREAM, name=consumer, durable_name=consumer,
                               filter_subject=other_jobs, ack_policy=api.AckPolicy.EXPLICIT),
        f"$JS.API.CONSUMER.CREATE.{subjects.JOBS_STREAM}.{consumer}.{other_jobs}",
    )
    await runner.refused_call(
        runner.js.consumer_info(subjects.JOBS_STREAM, other_consumer),
        f"$JS.API.CONSUMER.INFO.{subjects.JOBS_STREAM}.{other_consumer}",
    )
    await _publish_refused(runner, f"$JS.API.CONSUMER.MSG.NEXT.{subjects.JOBS_STREAM}.{other_consumer}")
    await _publish_refused(runner, other_jobs)
    await _publish_refused(runner, f"{subjects.ARENA_PREFIX}.vote.x")
    await _publish_refused(runner, subjects.gen_subject(MODEL))


async def test_admin_may_do_anything(planes, join):
    admin = await join("admin")
    await admin.js.add_stream(name="SCRATCH", subjects=["scratch.>"])
    await admin.js.delete_stream("SCRATCH")
    await admin.nc.subscribe(">")
    await admin.assert_clean()


# -- TLS ------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


async def test_tls_with_client_certificates(pki, passwords, tmp_path):
    tls = (f'tls {{\n  cert_file: "{pki / "server.pem"}"\n  key_file: "{pki / "server.key"}"\n'
           f'  ca_file: "{pki / "ca.pem"}"\n  verify: true\n  timeout: 2\n}}\n')
    # The block is appended to the generated config like the authorization block it follows.
    srv = EmbeddedServer(port=free_port(), store_dir=tmp_path / "nats",
                         authorization=auth.render_authorization(passwords) + tls).start()
    url = f"tls://127.0.0.1:{srv.port}"
    try:
        good = auth.NatsAuth.for_role("worker", passwords, ca=pki / "ca.pem", cert=pki / "client.pem",
                                      key=pki / "client.key")
        nc = await nats.connect(url, allow_reconnect=False, **good.connect_options("worker"))
        await nc.publish(f"{subjects.ALIVE_PREFIX}.w1", b"alive")
        await nc.flush()
        await nc.close()
        no_client_cert = auth.NatsAuth.for_role("worker", passwords, ca=pki / "ca.pem")
        with pytest.raises((OSError, nats.errors.Error)):  # the server drops the handshake
            await nats.connect(url, allow_reconnect=False, connect_timeout=2,
                               **no_client_cert.connect_options("worker"))
        untrusting = auth.NatsAuth.for_role("worker", passwords, cert=pki / "client.pem", key=pki / "client.key")
        with pytest.raises(ssl.SSLCertVerificationError):  # the system CAs do not know ours
            await nats.connect(url, allow_reconnect=False, connect_timeout=2,
                               **untrusting.connect_options("worker"))
    finally:
        srv.stop()


# -- the embedded server and the shipped configuration -------------------------------------------------


def test_embedded_config_holding_passwords_is_private(server):
    assert (server.store_dir.stat().st_mode & 0o777) == 0o700
    conf = server.store_dir / "nats-server.conf"
    assert (conf.stat().st_mode & 0o777) == 0o600
    assert "authorization {" in conf.read_text()


def test_embedded_server_refuses_to_listen_beyond_loopback_without_authorization(tmp_path):
    with pytest.raises(ValueError, match="without an authorization block"):
        EmbeddedServer(host="0.0.0.0", port=free_port(), store_dir=tmp_path).start()
    assert not (tmp_path / "nats-server.conf").exists()


def test_shipped_permissions_are_the_rendered_roles():
    shipped = (ROOT / "deploy" / "nats" / "permissions.conf").read_text()
    assert shipped == auth.SHIPPED_HEADER + auth.render_authorization(from_env=True), (
        "regenerate: python -m chatfabric.proto.auth render > deploy/nats/permissions.conf"
    )


def _password_env() -> dict[str, str]:
    return {auth.password_env(name): auth.new_password() for name in roles.ROLES}


def test_shipped_server_config_is_valid():
    result = subprocess.run(
        [find_nats_server(), "-c", str(ROOT / "deploy" / "nats" / "nats-server.conf"), "-t"],
        env={**os.environ, **_password_env()}, capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


async def test_shipped_permissions_take_passwords_from_the_environment(tmp_path):
    shutil.copy(ROOT / "deploy" / "nats" / "permissions.conf", tmp_path / "permissions.conf")
    port = free_port()
    (tmp_path / "nats.conf").write_text(
        f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\ninclude permissions.conf\n'
    )
    env = _password_env()
    proc = subprocess.Popen([find_nats_server(), "-c", str(tmp_path / "nats.conf")],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
            await asyncio.sleep(0.05)
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, user="worker",
                                password=env[auth.password_env("worker")])
        await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, user="worker",
                               password=env[auth.password_env("gateway")])
    finally:
        proc.terminate()
        proc.wait(10)
