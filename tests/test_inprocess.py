"""The contract tier: gateway, worker and bus in this test's own event loop, in seconds. A real
nats-server on a free port, the real aiohttp gateway on a free port, the official `openai` SDK
as the client, and workers on the synthetic backend (no model compute: each token is " hello").
The real-model tiers (test_api, test_faults, test_hardening) check what needs the model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import openai
import pytest
from aiohttp.test_utils import TestServer

from chatfabric.gateway.app import GatewayConfig, create_app
from chatfabric.proto.bus import BusConfig, BusLost, connect
from chatfabric.proto.embedded import EmbeddedServer, free_port
from chatfabric.proto.messages import decode_chunks
from chatfabric.proto.outbox import ReplyStream
from chatfabric.worker.prompting import PromptBuilder
from chatfabric.worker.config import WorkerConfig
from chatfabric.worker.service import Worker
from chatfabric.worker.synthetic import SyntheticBackend

FAST = BusConfig(ack_wait=2.0, registry_ttl=2.0)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    with EmbeddedServer(port=free_port(), store_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="module")
async def fabric(nats_server, tokenizer):
    """A gateway (liveness timeout 0.5 s) and a worker of model 'syn' (beats every 0.1 s), each on
    its own connection as in production; the OpenAI SDK pointed at the gateway."""
    config = dataclasses.replace(FAST, url=nats_server.url)
    async with contextlib.AsyncExitStack() as stack:
        gw_bus = await stack.enter_async_context(connect(config, "test-gateway", role="gateway"))
        server = TestServer(create_app(gw_bus, GatewayConfig(liveness_timeout=0.5, heartbeat_timeout=5)))
        await server.start_server()
        stack.push_async_callback(server.close)
        worker = await start_worker(stack, config, tokenizer, "syn", token_delay=0.01)
        client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0,
                                    timeout=30)
        await wait_until(lambda: models(client), {"syn"})
        yield client, worker, config
        await client.close()


async def start_worker(stack, config, tokenizer, model, token_delay=0.0, **worker_args):
    bus = await stack.enter_async_context(connect(config, f"test-worker-{model}", role="worker"))
    worker = Worker(bus, SyntheticBackend(tokenizer, token_delay=token_delay), PromptBuilder(tokenizer),
                    WorkerConfig(model_name=model, heartbeat_interval=0.1, **worker_args))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))

    async def stop_worker():
        stop.set()
        with contextlib.suppress(Exception):
            await task

    stack.push_async_callback(stop_worker)
    return worker


async def models(client) -> set[str]:
    return {m.id async for m in client.models.list()}


async def wait_until(probe, expected, timeout: float = 10.0):
    async with asyncio.timeout(timeout):
        while (value := await probe()) != expected and not (isinstance(expected, set) and expected <= value):
            await asyncio.sleep(0.05)
    return value


async def test_chat_and_completions_round_trip(fabric):
    client, _, _ = fabric
    reply = await client.chat.completions.create(model="syn", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3)
    assert reply.choices[0].message.content == " hello" * 3
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    many = await client.completions.create(model="syn", prompt=["a", "b"], n=3, max_tokens=2)
    assert sorted(c.index for c in many.choices) == list(range(6))
    assert many.usage.completion_tokens == 12


async def test_stream_carries_usage_and_ends_with_done(fabric):
    client, _, _ = fabric
    stream = await client.chat.completions.create(model="syn", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " hello" * 5 and chunks[-1].usage.completion_tokens == 5


async def test_errors_keep_the_openai_envelope(fabric):
    client, _, _ = fabric
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="syn", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2, extra_body={"min_tokens": 3})
    assert bad.value.body["param"] == "min_tokens"


async def test_a_client_that_leaves_frees_the_worker(fabric):
    client, worker, _ = fabric
    stream = await client.completions.create(model="syn", prompt="x", max_tokens=5000, stream=True)
    async for _ in stream:
        break
    assert worker.in_flight == 1
    await stream.close()
    async with asyncio.timeout(5):
        while worker.in_flight:
            await asyncio.sleep(0.02)


async def test_forged_chunks_are_dropped(fabric, nats_server):
    """Someone publishing into a request's inbox under another worker id changes nothing."""
    client, _, config = fabric
    async with connect(config, "intruder") as intruder:
        sub = await intruder.nc.subscribe("_INBOX.cf.>")
        stream = await client.completions.create(model="syn", prompt="x", max_tokens=40, stream=True)
        first = await sub.next_msg(timeout=5)
        request_id = decode_chunks(first.data)[0].request_id
        forger = ReplyStream(intruder.open_outbox(), first.subject, request_id, "intruder")
        forger.seq = 1
        for _ in range(1, 60):
            forger.delta(" FORGED", 1)
        await intruder.close_outboxes()
        text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == " hello" * 40


async def test_a_worker_whose_beats_stop_fails_its_streams_fast(fabric, tokenizer):
    """Its connection is cut (as by kill -9): its started stream ends with worker_timeout within
    the gateway's liveness timeout, not the 5 s heartbeat timeout."""
    client, _, config = fabric
    with pytest.raises(BusLost):  # what the doomed worker's process would exit with
        await run_and_cut_a_worker(client, config, tokenizer)


async def run_and_cut_a_worker(client, config, tokenizer):
    async with contextlib.AsyncExitStack() as stack:
        doomed = await start_worker(stack, config, tokenizer, "doomed", token_delay=0.05)
        await wait_until(lambda: models(client), {"doomed"})
        stream = await client.completions.create(model="doomed", prompt="x", max_tokens=1000, stream=True)
        async for _ in stream:
            break
        await doomed.bus.nc.close()  # no drain, no deregistration: the bus just loses it
        loop = asyncio.get_running_loop()
        cut = loop.time()
        with pytest.raises(openai.APIError, match="probably died"):
            async for _ in stream:
                pass
        assert loop.time() - cut < 2.0
