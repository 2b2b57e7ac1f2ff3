"""The contract and the event plane against a real nats-server: streams, buckets and the object
store ensured from declarations (and mismatches refused or updated), events stored once per id
and confirmed only when stored, replays from any point and across a restart, artifacts pinned
by digest."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import uuid
from pathlib import Path

import nats
import pytest
from nats.js import api

from chatfabric.proto import contract, roles, subjects
from chatfabric.proto import replay as replay_module
from chatfabric.proto.bus import Bus, BusConfig, EventNotStored, connect
from chatfabric.proto.bus_errors import ArtifactMismatch
from chatfabric.proto.contract import ContractMismatch, ContractMissing, StreamSpec, build_contract
from chatfabric.proto.reconcile import differences
from chatfabric.proto.embedded import EmbeddedServer, find_nats_server, free_port
from chatfabric.proto.events import ConversationLog, JobProgress, Vote
from chatfabric.proto.messages import ChatMessage
from chatfabric.proto.replay import Invalid, replay

from conftest import restartable_port

pytestmark = pytest.mark.timeout(60)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8].upper()}"


def vote(n: int, **fields) -> Vote:
    return Vote(**{"id": f"vote-{n}", "winner": "model_a", "model_a": "m-one", "model_b": "m-two",
                   "anonymous": True, "conversation_a": f"ca{n}", "conversation_b": f"cb{n}", **fields})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = EmbeddedServer(port=free_port(), store_dir=tmp_path_factory.mktemp("eventplane") / "nats").start()
    yield srv
    srv.stop()


@pytest.fixture
async def bus(server):
    async with connect(BusConfig(url=server.url), "test", role="gateway") as opened:
        yield opened


class Restartable:
    """A server of one test that can be stopped and started again on its port and file store."""

    def __init__(self, store: Path):
        self.port, self.store = restartable_port(), store
        self.server = EmbeddedServer(port=self.port, store_dir=store).start()

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = EmbeddedServer(port=self.port, store_dir=self.store).start()


@pytest.fixture
def restartable(tmp_path):
    srv = Restartable(tmp_path / "nats")
    yield srv
    srv.stop()


async def restart(srv: Restartable, bus: Bus) -> None:
    """Stop and start the server; return once the bus has reconnected."""
    back = asyncio.Event()

    async def reconnected() -> None:
        back.set()

    bus.on_reconnect(reconnected)
    await asyncio.to_thread(srv.stop)
    await asyncio.to_thread(srv.start)
    await asyncio.wait_for(back.wait(), 15)


async def ids(read) -> list[str]:
    return [item.message.id async for item in read]


# -- the contract ---------------------------------------------------------------------------------


async def test_a_fresh_fabric_shows_the_whole_contract_once_a_gateway_joined(tmp_path):
    with EmbeddedServer(port=free_port(), store_dir=tmp_path / "nats") as srv:
        config = BusConfig(url=srv.url)
        async with connect(config, "test", role="worker") as worker:
            assert await worker.js.streams_info() == []  # a worker only binds
            with pytest.raises(ContractMissing, match="stream GEN does not exist"):
                await worker.ensure_consumer("m")
        async with connect(config, "test", role="gateway") as gateway:
            found = {info.config.name: info.config for info in await gateway.js.streams_info()}
            assert set(found) == {"GEN", "ARENA", "JOBS", "EVENTS", "KV_workers", "OBJ_models", "OBJ_training",
                                  "OBJ_judge", "OBJ_leaderboard"}
            for spec in gateway.contract.specs():
                assert differences(spec, found[spec.stream]) == [], spec.label
            assert gateway.registry is not None
            assert (await gateway.put_artifact(subjects.JUDGE_BUCKET, "empty", b"")).size == 0


class _Heard(logging.Handler):
    """Sets `event` when a record whose message contains `text` is logged."""

    def __init__(self, text: str):
        super().__init__(logging.INFO)
        self.text, self.event = text, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_joining_waits_for_jetstream_and_names_it_when_it_never_answers(tmp_path):
    """A process that joins while JetStream does not answer yet (a server starting, a cluster
    electing leaders) retries for `join_wait`; a server without JetStream is named after that."""
    port = restartable_port()
    plain = await asyncio.create_subprocess_exec(find_nats_server(), "-a", "127.0.0.1", "-p", str(port),
                                                 stdout=asyncio.subprocess.DEVNULL,
                                                 stderr=asyncio.subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    heard = _Heard("JetStream did not answer")
    logger = logging.getLogger("chatfabric.proto.bus")
    logger.addHandler(heard)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        opened = None
        for _ in range(100):  # until the plain server listens
            try:
                opened = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0)
                break
            except Exception:
                await asyncio.sleep(0.05)
        assert opened is not None, "nats-server did not listen"
        await opened.close()
        with pytest.raises(ConnectionError, match="JetStream did not answer while ensuring"):
            async with connect(BusConfig(url=url, join_wait=0.5), "test", role="gateway"):
                pass
        assert heard.event.is_set()  # it did retry before giving up

        heard.event.clear()

        async def join():
            async with connect(BusConfig(url=url, join_wait=30), "test", role="gateway") as bus:
                return {info.config.name for info in await bus.js.streams_info()}

        joining = asyncio.create_task(join())
        await asyncio.wait_for(heard.event.wait(), 15)  # it is waiting for JetStream now
        plain.terminate()
        await plain.wait()
        with EmbeddedServer(port=port, store_dir=tmp_path / "nats"):
            assert {"GEN", "EVENTS", "KV_workers"} <= await asyncio.wait_for(joining, 40)
    finally:
        logger.removeHandler(heard)
        logger.setLevel(level)
        if plain.returncode is None:
            plain.terminate()
            await plain.wait()


def test_the_roles_know_every_stream_of_the_contract():
    """The gateway's permissions are built from `roles.contract_streams()`."""
    assert set(roles.contract_streams()) == {spec.stream for spec in build_contract(BusConfig()).specs()}


async def test_ensure_refuses_what_jetstream_cannot_change_and_names_both_values(bus):
    name = unique("LIM")
    await bus.js.add_stream(name=name, subjects=[f"{name.lower()}.>"], retention=api.RetentionPolicy.LIMITS)
    wanted = StreamSpec(name, (f"{name.lower()}.>",), api.RetentionPolicy.WORK_QUEUE)
    with pytest.raises(ContractMismatch) as refused:
        await bus.ensure(wanted)
    message = str(refused.value)
    assert f"stream {name}: retention is limits on the server, the contract wants workqueue" in message
    assert "delete it" in message
    info = await bus.js.stream_info(name)
    assert info.config.retention == "limits"  # untouched


async def test_ensure_names_a_setting_jetstream_refused_to_update(bus):
    spec = dataclasses.replace(build_contract(BusConfig()).events, name=unique("EV"), subjects=(unique("ev") + ".>",))
    await bus.ensure(spec)
    with pytest.raises(ContractMismatch, match=r"num_replicas \(CHATFABRIC_REPLICAS\) is 1 on the server, "
                                               r"the contract wants 3; JetStream refused the update \(replicas"):
        await bus.ensure(dataclasses.replace(spec, replicas=3))


async def test_ensure_updates_what_jetstream_can_change_and_says_so(bus, caplog):
    name, subject = unique("Q"), unique("q")

    def gen_like(queue_limit: int) -> StreamSpec:
        spec = build_contract(BusConfig(queue_limit=queue_limit)).gen
        return dataclasses.replace(spec, name=name, subjects=(f"{subject}.>",))

    await bus.ensure(gen_like(256))
    with caplog.at_level(logging.WARNING, logger="chatfabric.proto.contract"):
        await bus.ensure(gen_like(512))
    assert (await bus.js.stream_info(name)).config.max_msgs_per_subject == 512
    assert f"stream {name}: max_msgs_per_subject (queue_limit) changed from 256 to 512" in caplog.text


async def test_two_processes_ensuring_at_once_both_succeed(server):
    name, subject = unique("TWO"), unique("two")
    spec = StreamSpec(name, (f"{subject}.>",), api.RetentionPolicy.LIMITS, max_age=3600.0)
    async with connect(BusConfig(url=server.url), "a", role="gateway") as a, \
            connect(BusConfig(url=server.url), "b", role="gateway") as b:
        await asyncio.gather(a.ensure(spec), b.ensure(spec))
        # one of two differing but compatible declarations wins; neither fails
        await asyncio.gather(a.ensure(dataclasses.replace(spec, max_age=7200.0)),
                             b.ensure(dataclasses.replace(spec, max_age=5400.0)))
    assert (await _info(server.url, name)).config.max_age in (7200.0, 5400.0)


async def _info(url: str, stream: str) -> api.StreamInfo:
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()


async def test_a_workers_consumer_follows_the_configured_ack_wait(bus):
    model = unique("m-ack-")
    await bus.ensure_consumer(model)
    slower = Bus(bus.nc, BusConfig(ack_wait=45.0))
    await slower.ensure_consumer(model)
    info = await bus.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(model))
    assert info.config.ack_wait == 45.0


# -- events ---------------------------------------------------------------------------------------


async def test_a_vote_published_twice_is_stored_once(bus):
    cast = vote(1, id=unique("v"))
    first = await bus.publish_event(cast)
    again = await bus.publish_event(cast)  # a retry, e.g. after a lost acknowledgement
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    stored = [item.seq async for item in replay(bus, Vote, start_seq=first.seq) if item.message.id == cast.id]
    assert stored == [first.seq]


async def test_publish_event_raises_while_jetstream_is_down_and_succeeds_after(restartable):
    async with connect(BusConfig(url=restartable.url), "test", role="gateway") as bus:
        cast = vote(7, id=unique("v"))
        back = asyncio.Event()

        async def reconnected() -> None:
            back.set()

        bus.on_reconnect(reconnected)
        await asyncio.to_thread(restartable.stop)
        with pytest.raises(EventNotStored, match="publishing it again is safe"):
            await bus.publish_event(cast, retry_for=1.0)
        await asyncio.to_thread(restartable.start)
        await asyncio.wait_for(back.wait(), 15)
        ack = await bus.publish_event(cast)
        assert ack.stream == subjects.ARENA_STREAM
        # the unconfirmed attempt may have landed after the reconnect: still one vote
        assert await ids(replay(bus, Vote)) == [cast.id]


async def test_replay_from_the_start_a_time_or_a_sequence_up_to_a_time_across_a_restart(restartable):
    async with connect(BusConfig(url=restartable.url), "test", role="gateway") as bus:
        before = [vote(n) for n in range(5)]
        for cast in before:
            await bus.publish_event(cast)
        await bus.publish_event(JobProgress(job_id="j1", kind="judge", done=1))  # another stream
        await restart(restartable, bus)
        after = [vote(n) for n in range(5, 10)]
        for cast in after:
            await bus.publish_event(cast)
        await bus.publish_event(ConversationLog(model="m-one", messages=(ChatMessage(role="user", content="hi"),)))

        everything = [item async for item in replay(bus, Vote)]
        assert [i.message.id for i in everything] == [v.id for v in before + after]  # nothing lost or doubled
        seqs = [i.seq for i in everything]
        assert seqs == sorted(set(seqs))
        between = (everything[4].time + everything[5].time) / 2  # the restart separates them
        assert await ids(replay(bus, Vote, start_time=between)) == [v.id for v in after]
        assert await ids(replay(bus, Vote, until=between)) == [v.id for v in before]
        assert await ids(replay(bus, Vote, start_seq=everything[3].seq)) == [v.id for v in (before + after)[3:]]
        assert await ids(replay(bus, Vote, start_seq=everything[-1].seq + 100)) == []


async def test_a_replay_interrupted_by_a_restart_resumes_where_it_was(restartable, monkeypatch):
    monkeypatch.setattr(replay_module, "EXPIRES_SECONDS", 0.5)  # notice the lost consumer sooner
    monkeypatch.setattr(replay_module, "STALL_SECONDS", 0.5)
    async with connect(BusConfig(url=restartable.url), "test", role="gateway") as bus:
        casts = [vote(n) for n in range(40)]
        for cast in casts:
            await bus.publish_event(cast)
        read, seen = replay(bus, Vote, batch=5), []
        async for item in read:
            seen.append(item.message.id)
            if len(seen) == 12:
                await restart(restartable, bus)  # the replay's consumer lives in memory: gone
        assert seen == [c.id for c in casts]


async def test_replay_stops_at_the_tail_as_of_the_call_in_small_batches(bus):
    name = unique("arena-")  # a filter of its own within ARENA
    casts = [vote(n, id=unique("v"), model_a=name) for n in range(25)]
    for cast in casts:
        await bus.publish_event(cast)
    read, seen = replay(bus, Vote, batch=4), []
    async for item in read:
        if item.message.model_a != name:
            continue
        seen.append(item.message.id)
        if len(seen) == 1:
            await bus.publish_event(vote(99, id=unique("late"), model_a=name))
    assert seen == [c.id for c in casts]


async def test_an_invalid_message_is_reported_with_its_sequence_and_skipped(bus, caplog):
    # a filter of its own: the named votes of this test only
    good = [vote(n, id=unique("v"), anonymous=False) for n in range(3)]
    start = await bus.publish_event(good[0])
    await bus.nc.publish(subjects.vote_subject(False), b"not json")
    await bus.nc.publish(subjects.vote_subject(False), b'{"v": 1, "id": "x", "winner": "model_c"}')
    await bus.publish_event(good[1])
    await bus.publish_event(good[2])
    rejected: list[Invalid] = []
    read = replay(bus, Vote, subjects.vote_subject(False), start_seq=start.seq, on_invalid=rejected.append)
    with caplog.at_level(logging.WARNING, logger="chatfabric.proto.replay"):
        assert await ids(read) == [v.id for v in good]
    assert read.invalid == 2 and read.delivered == 3
    assert [r.seq for r in rejected] == [start.seq + 1, start.seq + 2]
    assert "winner" in rejected[1].reason and rejected[0].data == b"not json"
    assert f"skipped sequence {start.seq + 1}" in caplog.text


async def test_replay_refuses_a_work_queue(bus):
    with pytest.raises(ValueError, match="JOBS is a work queue"):
        async for _ in replay(bus, Vote, "jobs.>", stream=subjects.JOBS_STREAM):
            pass


# -- artifacts ------------------------------------------------------------------------------------


async def test_an_artifact_round_trips_and_its_reference_pins_the_content(bus):
    name = unique("adapter-") + ".safetensors"
    payload = os.urandom(300_000)  # several chunks
    ref = await bus.put_artifact(subjects.MODELS_BUCKET, name, payload, description="a LoRA adapter")
    assert ref.digest == "sha256:" + hashlib.sha256(payload).hexdigest() and ref.size == len(payload)
    assert await bus.get_artifact(ref) == payload
    await bus.put_artifact(subjects.MODELS_BUCKET, name, b"another version")
    with pytest.raises(ArtifactMismatch, match="changed since it was referenced"):
        await bus.get_artifact(ref)
    with pytest.raises(ArtifactMismatch, match="is not in"):
        await bus.get_artifact(ref.model_copy(update={"name": unique("missing-")}))


async def test_an_artifact_read_while_it_is_replaced_gets_one_whole_version_and_keeps_no_subscription(bus):
    name = unique("snapshot-")
    versions = [bytes([n]) * 200_000 for n in range(12)]  # two chunks each: a purge can land between them
    await bus.put_artifact(subjects.MODELS_BUCKET, name, versions[0])
    subscriptions = len(bus.nc._subs)

    async def replace_all() -> None:
        for payload in versions[1:]:
            await bus.put_artifact(subjects.MODELS_BUCKET, name, payload)

    writer = asyncio.create_task(replace_all())
    reads = []
    while not writer.done():
        reads.append(await asyncio.wait_for(bus.read_artifact(subjects.MODELS_BUCKET, name), 30))
    await writer
    assert reads and all(read in versions for read in reads)
    assert await bus.read_artifact(subjects.MODELS_BUCKET, name) == versions[-1]
    assert len(bus.nc._subs) == subscriptions


# -- configuration --------------------------------------------------------------------------------


def test_the_contract_comes_from_the_configuration(monkeypatch):
    monkeypatch.setenv("CHATFABRIC_REPLICAS", "3")
    monkeypatch.setenv("CHATFABRIC_DUPLICATE_WINDOW", "300")
    monkeypatch.setenv("CHATFABRIC_EVENTS_MAX_AGE", "86400")
    built = build_contract(BusConfig.from_env())
    assert {spec.replicas for spec in built.specs()} == {3}
    assert built.events.max_age == 86400 and built.events.duplicate_window == 300
    assert built.arena.max_age == 0 and built.arena.retention == api.RetentionPolicy.LIMITS
    assert built.jobs.subjects == (subjects.JUDGE_JOBS, subjects.TRAIN_JOBS)
    assert contract.job_consumer(BusConfig(), "train").name == subjects.TRAIN_CONSUMER


@pytest.mark.parametrize("kwargs, problem", [
    ({"replicas": 7}, "replicas must be between 1 and 5"),
    ({"duplicate_window": 0}, "duplicate_window must be positive"),
    ({"events_max_age": 60}, r"duplicate_window \(120 s\) must not exceed events_max_age \(60 s\)"),
])
def test_a_contract_jetstream_would_refuse_is_refused_first(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        BusConfig(**kwargs)
