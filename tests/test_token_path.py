"""The token path's pieces against a real nats-server: a worker's outbox sends one message per
gateway per event-loop turn, numbers every stream's chunks without a gap, coalesces deltas only
within its interval and never delays what must not wait; the stepped synthetic engine advances
its sequences together and frees each; the streaming detokenizer equals the window decoder."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.embedded import EmbeddedServer, free_port
from chatfabric.proto.messages import DeltaChunk, FinalChunk, HeartbeatChunk, Usage, decode_chunks
from chatfabric.proto.outbox import ReplyStream
from chatfabric.worker.backend import Sampling
from chatfabric.worker.synthetic import SyntheticBackend
from chatfabric.worker.textstream import IncrementalDetokenizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    with EmbeddedServer(port=free_port(), store_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
async def bus(nats_server):
    async with connect(BusConfig(url=nats_server.url), "test-token-path") as opened:
        yield opened


async def received(sub, until) -> list:
    """Messages on `sub` until `until(messages)` holds (or 10 s pass: then what came)."""
    messages = []
    async with asyncio.timeout(10):
        while not until(messages):
            messages.append(await sub.next_msg(timeout=10))
    return messages


async def test_one_turn_of_many_streams_leaves_as_one_message_per_gateway(bus):
    subs = {inbox: await bus.nc.subscribe(inbox) for inbox in ("_INBOX.cf.gw-a", "_INBOX.cf.gw-b")}
    await bus.nc.flush()
    outbox = bus.open_outbox(0.0)
    streams = [ReplyStream(outbox, inbox, f"r{i}-{inbox[-1]}", "w1") for i in range(40) for inbox in subs]
    for stream in streams:  # one engine step: every stream's token in the same turn
        stream.delta(" hello", 1)
    for inbox, sub in subs.items():
        (message,) = await received(sub, lambda got: len(got) == 1)
        chunks = decode_chunks(message.data)
        assert [c.request_id for c in chunks] == [s.request_id for s in streams if s.inbox == inbox]
        assert all(isinstance(c, DeltaChunk) and c.seq == 0 and c.text == " hello" for c in chunks)
    for stream in streams:
        stream.final("length", Usage(1, 1, 2))
    for sub in subs.values():
        (message,) = await received(sub, lambda got: len(got) == 1)
        assert [type(c) for c in decode_chunks(message.data)] == [FinalChunk] * 40


# a stream's life as a script: ("delta", text) | ("beat",) | ("turn",): let the loop go round
STEP = st.one_of(st.tuples(st.just("delta"), st.text(max_size=4)), st.tuples(st.just("beat")),
                 st.tuples(st.just("turn")))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scripts=st.lists(st.lists(STEP, max_size=12), min_size=1, max_size=6),
       interval=st.sampled_from([0.0, 0.003]))
async def test_every_stream_arrives_whole_and_in_order_however_its_chunks_were_batched(bus, scripts, interval):
    inbox = f"_INBOX.cf.gw-{free_port()}"
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.flush()
    outbox = bus.open_outbox(interval)
    streams = [ReplyStream(outbox, inbox, f"r{i}", "w1") for i in range(len(scripts))]
    texts = [""] * len(scripts)
    for turn in range(max(len(s) for s in scripts)):
        for i, script in enumerate(scripts):
            if turn < len(script):
                kind = script[turn][0]
                if kind == "delta":
                    streams[i].delta(script[turn][1], 1)
                    texts[i] += script[turn][1]
                elif kind == "beat":
                    streams[i].heartbeat(True, None)
        if any(turn < len(s) and s[turn][0] == "turn" for s in scripts):
            await asyncio.sleep(0)
    for stream in streams:
        stream.final("length", Usage(0, 0, 0))

    def finished(messages) -> bool:
        return sum(isinstance(c, FinalChunk) for m in messages for c in decode_chunks(m.data)) == len(streams)

    chunks = [c for m in await received(sub, finished) for c in decode_chunks(m.data)]
    await sub.unsubscribe()
    for i, (stream, script) in enumerate(zip(streams, scripts)):
        mine = [c for c in chunks if c.request_id == stream.request_id]
        assert [c.seq for c in mine] == list(range(len(mine)))  # numbered without a gap
        assert isinstance(mine[-1], FinalChunk) and len(mine) == stream.seq
        assert "".join(c.text for c in mine if isinstance(c, DeltaChunk)) == texts[i]
        deltas = sum(step[0] == "delta" for step in script)
        assert sum(c.token_count for c in mine if isinstance(c, DeltaChunk)) == deltas
        assert sum(isinstance(c, HeartbeatChunk) for c in mine) == sum(step[0] == "beat" for step in script)
        if interval == 0.0:  # nothing waits: deltas merge only within one turn
            assert len([c for c in mine if isinstance(c, DeltaChunk)]) <= deltas


async def test_a_streams_first_text_never_waits_for_the_interval(bus):
    inbox = "_INBOX.cf.gw-first"
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.flush()
    outbox = bus.open_outbox(60.0)  # later text would wait a minute
    early = ReplyStream(outbox, inbox, "early", "w1")
    early.delta("a", 1)
    (first,) = await received(sub, lambda got: len(got) == 1)
    assert [c.text for c in decode_chunks(first.data)] == ["a"]
    early.delta("b", 1)  # waits: the interval runs
    late = ReplyStream(outbox, inbox, "late", "w1")
    late.delta("x", 1)  # a new stream's first text: sent at once, with what waited
    (second,) = await received(sub, lambda got: len(got) == 1)
    assert [(c.request_id, c.seq, c.text) for c in decode_chunks(second.data)] == [("early", 1, "b"), ("late", 0, "x")]
    early.delta("c", 1)
    early.delta("d", 1)  # joins "c"
    await outbox.close()  # closing sends what waits
    (third,) = await received(sub, lambda got: len(got) == 1)
    assert [(c.seq, c.text, c.token_count) for c in decode_chunks(third.data)] == [(2, "cd", 2)]


async def test_the_stepped_engine_advances_every_sequence_together_and_frees_each(tokenizer):
    backend = SyntheticBackend(tokenizer, step=0.002)
    lengths = [3, 7, 12]

    async def read(n: int) -> list:
        return [e async for e in backend.generate([1], Sampling(max_tokens=n))]

    # a reader that starts late still gets every token its sequence was given meanwhile
    slow = backend.generate([1], Sampling(max_tokens=5))
    first = await slow.__anext__()
    results = await asyncio.gather(*(read(n) for n in lengths))
    rest = [e async for e in slow]
    for n, events in zip(lengths, results):
        assert len(events) == n and [e.finish_reason for e in events] == [None] * (n - 1) + ["length"]
    assert [first, *rest][-1].finish_reason == "length" and len(rest) == 4
    closing = backend.generate([1], Sampling(max_tokens=100))
    await closing.__anext__()
    await closing.aclose()  # a cancelled sequence leaves the batch
    assert backend.running == 0
    await backend.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_streaming_detokenizer_equals_the_window_decoder(tokenizer, data):
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=24))
    tail = data.draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    fast = IncrementalDetokenizer(tokenizer, tail)
    # SmolLM2's tokenizer is a fast one: streamed, unless the prompt ends inside a character
    assert fast.streaming != tokenizer.decode(tail, skip_special_tokens=True).endswith("\ufffd")
    window = IncrementalDetokenizer(tokenizer, tail, streaming=False)
    assert not window.streaming
    as_streamed = "".join(fast.push(i) for i in ids) + fast.flush()
    assert as_streamed == "".join(window.push(i) for i in ids) + window.flush()
