"""Failure handling with real processes: several workers, kills, disconnects, expiry, full
queues, silent workers and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from nats.js.errors import KeyDeletedError, KeyNotFoundError

from chatfabric.proto import subjects
from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.messages import HeartbeatChunk, decode_chunks
from conftest import MODEL, http_json, make_fabric, wait_for

LONG = {"ignore_eos": True}


def openai_client(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)


def model_entry(base: str, model: str) -> dict | None:
    return {m["id"]: m for m in http_json(f"{base}/v1/models")["data"]}.get(model)


def consumer_state(nats_url: str, model: str) -> tuple[int, int]:
    """(requests waiting, requests delivered but not acked) of a model's consumer."""

    async def read():
        async with connect(BusConfig(url=nats_url), name="test") as bus:
            info = await bus.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(model))
            return info.num_pending, info.num_ack_pending

    return asyncio.run(read())


def worker_ids(base: str, model: str) -> set[str]:
    return {w["worker_id"] for w in http_json(f"{base}/health")["workers"] if model in w["models"]}


class Background(threading.Thread):
    """Runs one call in a thread and keeps its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as err:  # kept for the test to inspect
            self.error = err

    def value(self, timeout=120):
        self.join(timeout)
        assert not self.is_alive(), "background call did not finish"
        if self.error:
            raise self.error
        return self.result


def test_two_workers_share_one_queue(fabric, stack):
    model = "shared model/v1.0"  # a name with a space, a slash and dots
    fabric.worker(model, "--max-concurrency", "1")
    fabric.worker(model, "--max-concurrency", "1")
    fabric.wait_workers(stack, model, 2)
    client = openai_client(stack)

    def one(i):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=12,
            extra_body=LONG)
        return raw.headers["x-chatfabric-worker"], raw.parse().usage.completion_tokens

    calls = [Background(lambda i=i: one(i)) for i in range(6)]
    results = [c.value() for c in calls]
    assert all(tokens == 12 for _, tokens in results)
    assert len({worker for worker, _ in results}) == 2


def test_worker_killed_before_first_token_loses_nothing(fabric, stack, tokenizer):
    model = "redeliver-model"
    first = fabric.worker(model, "--max-concurrency", "1")
    fabric.wait_workers(stack, model, 1)
    killed_id = next(iter(worker_ids(stack, model)))
    # A long prompt keeps the first worker in prefill for seconds, before any token.
    prompt = "The quick brown fox jumps over the lazy dog. " * 300  # ~3,000 tokens: seconds of prefill
    client = openai_client(stack).with_options(timeout=600)
    call = Background(lambda: client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=5, extra_body=LONG))
    wait_for(lambda: (model_entry(stack, model) or {}).get("in_flight") == 1, 30, "the request to be admitted")
    first.signal(signal.SIGKILL)
    first.popen.wait()
    pending, unacked = consumer_state(fabric.nats_url, model)
    assert unacked == 1, "the killed worker had not acked: the request is still owned by the stream"
    fabric.worker(model, "--max-concurrency", "1")
    raw = call.value(timeout=600)
    resp = raw.parse()
    assert resp.usage.completion_tokens == 5
    assert resp.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert raw.headers["x-chatfabric-worker"] != killed_id


def test_client_disconnect_cancels_and_frees_the_slot(client, stack):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me everything about the ocean."}],
        max_tokens=4000, stream=True, extra_body=LONG)
    received = 0
    for _ in stream:
        received += 1
        if received == 3:
            break
    assert model_entry(stack, MODEL)["in_flight"] == 1
    stream.close()
    # 4000 tokens take minutes; a freed slot within seconds means the generation was cancelled.
    wait_for(lambda: model_entry(stack, MODEL)["in_flight"] == 0, 20, "the worker slot to be freed")


def test_registry_entry_expires_when_worker_dies(fabric, stack):
    model = "expiry-model"
    proc = fabric.worker(model)
    fabric.wait_workers(stack, model, 1)
    (worker_id,) = worker_ids(stack, model)

    async def has_key(key: str) -> bool:
        async with connect(BusConfig(url=fabric.nats_url), name="test") as bus:
            try:
                await (await bus.registry_bucket()).get(key)
                return True
            except (KeyNotFoundError, KeyDeletedError):
                return False

    assert asyncio.run(has_key(worker_id))

    proc.signal(signal.SIGKILL)
    proc.popen.wait()
    wait_for(lambda: model_entry(stack, model) is None, 15, "the dead worker to leave /v1/models")
    wait_for(lambda: not asyncio.run(has_key(worker_id)), 15, "the registry key to expire")
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(stack).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"]
    assert info.value.body["code"] == "model_unavailable"


@pytest.fixture
def small_fabric(model_dir, tmp_path):
    """A fabric of its own whose queues hold one waiting request per model."""
    fab = make_fabric(model_dir, tmp_path, CHATFABRIC_QUEUE_LIMIT="1")
    yield fab
    fab.close()


def one_slot_stack(fab, model: str):
    """A gateway that gives up after 2 s of worker silence, and one single-slot worker."""
    _, base = fab.gateway("--heartbeat-timeout", "2")
    worker = fab.worker(model, "--max-concurrency", "1", "--heartbeat-interval", "0.5")
    fab.wait_workers(base, model, 1)
    return base, worker, openai_client(base)


def test_full_queue_is_429_and_silent_worker_is_504(small_fabric):
    fab = small_fabric
    model = "tiny-queue"
    base, worker, client = one_slot_stack(fab, model)
    body = {"model": model, "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 3000, **LONG}

    running = client.chat.completions.create(stream=True, model=model, messages=body["messages"],
                                             max_tokens=3000, extra_body=LONG)
    next(iter(running))  # the first request has started: its slot is taken, the queue is empty
    queued = Background(lambda: client.chat.completions.create(
        model=model, messages=body["messages"], max_tokens=10, extra_body=LONG))
    wait_for(lambda: consumer_state(fab.nats_url, model)[0] == 1, 10, "the second request to queue")

    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 429
    assert info.value.headers["Retry-After"] == "1"
    assert json.loads(info.value.read())["error"]["code"] == "queue_full"

    # Freeze the worker mid-stream: the gateway must give up after its heartbeat timeout.
    worker.signal(signal.SIGSTOP)
    with pytest.raises(openai.APIError) as stream_err:
        for _ in running:
            pass
    assert "stopped responding" in str(stream_err.value)
    worker.signal(signal.SIGKILL)
    worker.popen.wait()
    # The queued request was never started; with its worker gone it waits for another one.
    fab.worker(model, "--max-concurrency", "1")
    resp = queued.value(timeout=180)
    assert resp.usage.completion_tokens == 10 and resp.choices[0].finish_reason == "length"


def test_non_stream_request_gets_504_when_worker_freezes(small_fabric):
    fab = small_fabric
    model = "freezer"
    base, worker, client = one_slot_stack(fab, model)
    call = Background(lambda: client.completions.create(model=model, prompt="Once", max_tokens=3000,
                                                        extra_body=LONG))
    wait_for(lambda: (model_entry(base, model) or {}).get("in_flight") == 1
             and consumer_state(fab.nats_url, model) == (0, 0), 30, "the request to start (acked)")
    worker.signal(signal.SIGSTOP)
    with pytest.raises(openai.APIStatusError) as info:
        call.value(timeout=60)
    assert info.value.status_code == 504
    assert info.value.body["code"] == "worker_timeout"
    worker.signal(signal.SIGKILL)


def test_graceful_shutdown_finishes_started_requests(fabric, stack):
    model = "graceful-model"
    proc = fabric.worker(model)
    fabric.wait_workers(stack, model, 1)
    stream = openai_client(stack).completions.create(
        model=model, prompt="Once upon a time", max_tokens=40, stream=True, extra_body=LONG,
        stream_options={"include_usage": True})
    chunks = iter(stream)
    next(chunks)
    proc.signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].usage.completion_tokens == 40
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
    assert proc.popen.wait(30) == 0
    # deregistered on the way out, not left to expire
    assert model_entry(stack, model) is None


def test_requests_beyond_the_kv_budget_wait_in_the_stream(fabric, stack):
    model = "small-cache"
    fabric.worker(model, "--kv-cache-tokens", "150", "--max-concurrency", "4")
    fabric.wait_workers(stack, model, 1)
    client = openai_client(stack)
    ask = lambda i: client.chat.completions.create(  # noqa: E731  ~40 prompt + 60 = ~100 KV tokens each: one fits
        model=model, messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=60, extra_body=LONG)
    calls = [Background(lambda i=i: ask(i)) for i in range(4)]
    assert [c.value(timeout=240).usage.completion_tokens for c in calls] == [60] * 4
    # a request that can never fit is refused, not left waiting
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=400)
    assert "KV cache" in info.value.message


# -- faults detected in seconds -----------------------------------------------------------------


def test_a_killed_worker_fails_its_streams_within_seconds(fabric):
    """Not the 15 s per-request heartbeat timeout: the worker's liveness beats stop, and the
    gateway ends every started stream of it within the liveness timeout (3 s)."""
    _, base = fabric.gateway()  # default --heartbeat-timeout 15
    model = "killed-mid-stream"
    worker = fabric.worker(model, "--max-concurrency", "2")
    fabric.wait_workers(base, model, 1)
    client = openai_client(base)
    streams = [iter(client.completions.create(model=model, prompt=f"Story {i}:", max_tokens=3000, stream=True,
                                              extra_body=LONG)) for i in range(2)]
    for s in streams:
        next(s)

    def drain(stream):
        try:
            for _ in stream:
                pass
        except openai.APIError as err:
            return time.monotonic(), str(err)
        return time.monotonic(), "finished"

    waiting = [Background(lambda s=s: drain(s)) for s in streams]
    killed_at = time.monotonic()
    worker.signal(signal.SIGKILL)
    for call in waiting:
        ended_at, outcome = call.value(timeout=60)
        print(f"measured: stream ended {ended_at - killed_at:.2f}s after kill -9: {outcome}")
        assert "probably died" in outcome
        assert ended_at - killed_at < 5.0, f"the stream ended {ended_at - killed_at:.1f}s after the kill"


def test_a_busy_worker_is_not_taken_for_dead(fabric, tokenizer):
    """A long prefill beside a running stream on a 2-core CPU: the beats come from the worker's
    event loop, not its engine thread, so nobody fails. The prompt is prefilled in one pass
    (--prefill-chunk above its length), which blocks the engine thread for seconds, several
    times the gateway's liveness timeout."""
    _, base = fabric.gateway("--liveness-timeout", "1")
    model = "busy-worker"
    fabric.worker(model, "--max-concurrency", "2", "--heartbeat-interval", "0.3", "--prefill-chunk", "4096")
    fabric.wait_workers(base, model, 1)
    client = openai_client(base)
    running = Background(lambda: client.completions.create(model=model, prompt="Once", max_tokens=60,
                                                           extra_body=LONG))
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 300  # ~3,000 tokens
    assert len(tokenizer(long_prompt)["input_ids"]) < 4096
    prefill = Background(lambda: client.completions.create(model=model, prompt=long_prompt, max_tokens=2,
                                                           extra_body=LONG))
    assert running.value(timeout=240).usage.completion_tokens == 60
    assert prefill.value(timeout=240).usage.completion_tokens == 2


async def _sse(session, base: str, model: str, max_tokens: int) -> tuple[int, str]:
    """(status, how it ended): 'done', or the error code of an SSE error event or error body."""
    body = {"model": model, "prompt": "x", "max_tokens": max_tokens, "stream": True}
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        if resp.status != 200:
            return resp.status, (await resp.json())["error"]["code"]
        ended = "done"
        async for line in resp.content:
            if line.startswith(b"data: {\"error\""):
                ended = json.loads(line[6:])["error"]["code"]
        return 200, ended


def test_nats_restart_costs_no_503_once_the_server_is_back(model_dir, tmp_path):
    """Streams run through a NATS restart on the same store; requests that arrive after the
    server is back must all be served (the workers' cards are re-put at once on reconnect, and
    the gateway keeps a worker whose beats it hears)."""
    import aiohttp

    fab = make_fabric(model_dir, tmp_path)
    model = "restart-model"
    try:
        _, base = fab.gateway()
        fab.worker(model, "--backend", "synthetic", "--synthetic-delay", "0.02", "--max-concurrency", "64")
        fab.wait_workers(base, model, 1)

        async def scenario():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
                in_flight = [asyncio.create_task(_sse(session, base, model, 150)) for _ in range(40)]
                await asyncio.sleep(1.0)
                await asyncio.to_thread(fab.server.stop)
                await asyncio.to_thread(fab.server.start)
                await asyncio.to_thread(wait_for, lambda: _health(base) == "ok", 30, "the gateway to reconnect")
                after = await asyncio.gather(*[_sse(session, base, model, 5) for _ in range(50)])
                return await asyncio.gather(*in_flight), after

        during, after = asyncio.run(scenario())
    finally:
        fab.close()
    print(f"measured: in flight during the restart: {Counter(ended for _, ended in during)}; "
          f"after it: {Counter(status for status, _ in after)}")
    assert [status for status, _ in after] == [200] * 50, after
    assert {ended for _, ended in after} == {"done"}
    # streams caught by the restart finish, or end with what happened to them, never hang
    assert {ended for _, ended in during} <= {"done", "stream_gap", "worker_timeout"}, during


def _health(base: str) -> str:
    try:
        return http_json(f"{base}/health")["status"]
    except urllib.error.HTTPError as err:  # 503 while NATS is away
        return json.loads(err.read())["status"]
    except OSError:
        return "down"


def test_sigterm_stops_a_gateway_whose_nats_is_gone(model_dir, tmp_path):
    fab = make_fabric(model_dir, tmp_path)
    try:
        gateway, base = fab.gateway()
        fab.server.stop()
        wait_for(lambda: _health(base) == "degraded", 15, "the gateway to notice")
        started = time.monotonic()
        gateway.signal(signal.SIGTERM)
        assert gateway.popen.wait(30) == 0
        assert time.monotonic() - started < 15
    finally:
        fab.close()


def test_a_request_whose_worker_dies_before_its_first_token_moves_at_once(model_dir, tmp_path, tokenizer):
    """With ack_wait at a minute, JetStream alone would wait that long to redeliver; the gateway
    sees the prefilling worker's beats stop and hands the delivery back within seconds."""
    fab = make_fabric(model_dir, tmp_path, CHATFABRIC_ACK_WAIT="60")
    model = "handed-back"
    try:
        _, base = fab.gateway()
        workers = [fab.worker(model, "--max-concurrency", "1") for _ in range(2)]
        fab.wait_workers(base, model, 2)
        prompt = "The quick brown fox jumps over the lazy dog. " * 150  # ~1,500 tokens: seconds of prefill
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        call = Background(lambda: client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=3, extra_body=LONG))

        doomed = asyncio.run(first_heartbeat(fab.nats_url, timeout=30))
        victim = next(w for w in workers if w.popen.pid == int(doomed.split("-")[-2]))
        killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)
        wait_for(lambda: consumer_delivered(fab.nats_url, model) == 2, 20, "the request to be redelivered")
        print(f"measured: redelivered {time.monotonic() - killed_at:.1f}s after the prefilling worker was killed "
              "(ack_wait 60 s)")
        raw = call.value(timeout=240)
        assert raw.parse().usage.completion_tokens == 3
        assert raw.headers["x-chatfabric-worker"] != doomed
    finally:
        fab.close()


async def first_heartbeat(nats_url: str, timeout: float) -> str:
    """Listen on the token plane until a worker heartbeats a request it has not started yet
    (the gateway then knows where to hand it back); return that worker's id."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe(f"{subjects.INBOX_PREFIX}.>")
        while True:
            for chunk in decode_chunks((await sub.next_msg(timeout=timeout)).data):
                if isinstance(chunk, HeartbeatChunk) and chunk.ack_subject:
                    return chunk.worker_id
    finally:
        await nc.close()


def consumer_delivered(nats_url: str, model: str) -> int:
    """How many deliveries a model's consumer has made (a redelivery counts again)."""

    async def read():
        async with connect(BusConfig(url=nats_url), name="test") as bus:
            info = await bus.js.consumer_info(subjects.GEN_STREAM, subjects.gen_consumer(model))
            return info.delivered.consumer_seq

    return asyncio.run(read())
