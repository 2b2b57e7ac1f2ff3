"""Bad input through the real gateway and a real SmolLM2 worker: the reproducers of defects that
once poisoned a worker, took a gateway off the bus or answered 500, plus property-based fuzz of
both endpoints. Every request gets a 4xx with the OpenAI envelope or succeeds; nothing hangs;
the worker and gateway stay healthy and the worker's KV budget comes back whole."""

from __future__ import annotations

import json
import threading
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MODEL, http_json, wait_for
from test_errors import assert_envelope, post

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def chat(base: str, **fields) -> tuple[int, dict]:
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 3, **fields}
    status, _, resp = post(f"{base}/v1/chat/completions", json.dumps(body).encode())
    return status, resp


def worker_settles(base: str) -> dict:
    """Wait until the default model's worker runs nothing and holds no KV reservation."""

    def idle():
        workers = [w for w in http_json(f"{base}/health")["workers"] if MODEL in w["models"]]
        w = workers[0] if workers else {}
        free, total = w.get("kv_free_tokens"), w.get("kv_cache_tokens")
        return w if w.get("in_flight") == 0 and free == total else None

    return wait_for(idle, 30, "the worker to be idle with its whole KV budget free")


def assert_healthy(base: str, client) -> None:
    assert http_json(f"{base}/health")["status"] == "ok"
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    assert "Paris" in reply.choices[0].message.content
    worker_settles(base)


# -- the reproducers ------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"temperature": 1e-38}, {"temperature": 1e-300}, {"temperature": 5e-324},
    {"temperature": 2.0, "top_p": 1e-300}, {"temperature": 1.0, "top_k": 10**9},
    {"repetition_penalty": 1e-300, "temperature": 1.0}, {"repetition_penalty": 1e300},
    {"presence_penalty": -2, "frequency_penalty": 2, "temperature": 1e-30},
    {"logit_bias": {str(t): 100 for t in range(50)}, "temperature": 1e-20},
    {"logit_bias": {"0": -100, "2": 100}, "min_tokens": 3},
    {"seed": -(2**63), "temperature": 0.7}, {"seed": 2**63 - 1, "temperature": 0.7},
])
def test_extreme_sampling_values_are_served(stack, fields):
    status, resp = chat(stack, **fields)
    assert status == 200, resp
    assert resp["usage"]["completion_tokens"] >= 1


def test_a_poisonous_request_does_not_touch_a_running_stream(stack, client):
    """The original report: temperature 1e-38 broke the engine step of every sequence on it."""
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=40,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    poisons = [threading.Thread(target=chat, args=(stack,), kwargs={"temperature": t}) for t in (1e-38, 1e-300)]
    for p in poisons:
        p.start()
    rest = list(chunks)
    for p in poisons:
        p.join(60)
    assert rest[-1].usage.completion_tokens == 40
    assert_healthy(stack, client)


@pytest.mark.parametrize("path", ["/v1/models/" + "m" * 5000, "/v1/models/" + urllib.parse.quote("é" * 100)])
def test_a_long_model_name_is_400_and_the_gateway_stays_on_the_bus(stack, client, path):
    status, _, resp = post(f"{stack}/v1/chat/completions", json.dumps(
        {"model": "m" * 5000, "messages": FRANCE}).encode())
    assert status == 400
    assert_envelope(resp, param="model", contains="at most 256 characters")
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{stack}{path}", timeout=10)
    assert info.value.code == 400
    assert_envelope(json.loads(info.value.read()), param="model")
    assert_healthy(stack, client)


@pytest.mark.parametrize("raw, param, contains", [
    (json.dumps({"model": MODEL, "messages": FRANCE, "max_tokens": 2, "min_tokens": 5}), "min_tokens", "exceed"),
    (json.dumps({"model": MODEL, "messages": FRANCE, "max_completion_tokens": 2, "min_tokens": 5}),
     "min_tokens", "exceed"),
    (json.dumps({"model": MODEL, "messages": FRANCE, "min_tokens": 1_000_000}), "min_tokens", "context length"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL,
     "messages.0.content", "surrogate"),
    ('{"model": "%s", "messages": %s, "stop": ["\\udfff"]}' % (MODEL, json.dumps(FRANCE)), "stop.0", "surrogate"),
    ('{"model": "%s", "messages": %s, "temperature": NaN}' % (MODEL, json.dumps(FRANCE)), None, "NaN"),
    ('{"model": "%s", "messages": %s, "top_p": Infinity}' % (MODEL, json.dumps(FRANCE)), None, "Infinity"),
    ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
    ('{"model": "%s", "messages": %s, "x": %s}' % (MODEL, json.dumps(FRANCE), "[" * 50_000 + "]" * 50_000),
     None, "nested too deeply"),
    (json.dumps({"model": MODEL, "messages": FRANCE, "seed": 2**63 - 1, "n": 2}), "seed", None),
    (json.dumps({"model": MODEL, "messages": FRANCE, "logit_bias": {"49152": 1}}), "logit_bias", "out of range"),
    (json.dumps({"model": MODEL, "messages": FRANCE, "stop_token_ids": [10**6]}), "stop_token_ids", "out of range"),
    (json.dumps({"model": MODEL, "messages": FRANCE, "logit_bias": {"-1": 1}}), None, "logit_bias"),
])
def test_bodies_that_once_gave_500_are_400(stack, raw, param, contains):
    status, _, resp = post(f"{stack}/v1/chat/completions", raw.encode())
    assert status == 400, resp
    assert_envelope(resp, param=param, contains=contains)


def test_work_per_request_is_bounded(stack):
    url = f"{stack}/v1/completions"
    status, _, resp = post(url, json.dumps({"model": MODEL, "prompt": ["a"] * 64, "n": 16}).encode())
    assert status == 400
    assert_envelope(resp, param="prompt", contains="At most 32 prompts")
    status, _, resp = post(url, json.dumps({"model": MODEL, "prompt": ["a"] * 8, "n": 16}).encode())
    assert status == 400
    assert_envelope(resp, param="n", contains="at most 64")
    status, _, resp = post(url, json.dumps({"model": MODEL, "prompt": ["a"] * 4, "n": 2, "max_tokens": 1}).encode())
    assert status == 200 and len(resp["choices"]) == 8


# -- generated input --------------------------------------------------------------------------

FLOATS = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64),
                   st.sampled_from([0.0, 1e-300, 5e-324, 1e-38, 2.0, -0.0, 1e300]))
INTS = st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**30]))
JSON_LEAF = st.one_of(st.none(), st.booleans(), INTS, FLOATS, st.text(max_size=20))
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=8)
TEXT = st.text(max_size=60)


def sampling_fields():
    """Each sampling field: absent, a plausible value, an edge value or any JSON at all."""
    fields = {
        "temperature": st.one_of(FLOATS, st.floats(0, 2), ANY_JSON),
        "top_p": st.one_of(FLOATS, st.floats(0, 1), ANY_JSON),
        "top_k": st.one_of(INTS, ANY_JSON),
        "max_tokens": st.one_of(st.integers(1, 4), INTS, ANY_JSON),
        "min_tokens": st.one_of(st.integers(0, 4), INTS),
        "presence_penalty": st.one_of(st.floats(-2, 2), FLOATS),
        "frequency_penalty": st.one_of(st.floats(-2, 2), FLOATS),
        "repetition_penalty": st.one_of(st.floats(1e-3, 3), FLOATS),
        "seed": st.one_of(INTS, ANY_JSON),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20), ANY_JSON),
        "logit_bias": st.one_of(st.dictionaries(st.integers(-5, 60000).map(str), FLOATS, max_size=5), ANY_JSON),
        "stop_token_ids": st.one_of(st.lists(INTS, max_size=4), ANY_JSON),
        "n": st.one_of(st.integers(0, 3), INTS),
        "stream": st.booleans(),
        "ignore_eos": st.one_of(st.booleans(), ANY_JSON),
        "user": ANY_JSON,
        "unknown_field": ANY_JSON,
    }
    return st.fixed_dictionaries({}, optional=fields)


def capped(body: dict) -> dict:
    """A valid body must not generate for minutes on a 2-core CPU: at most 4 tokens (junk
    values of max_tokens stay, to be refused)."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None or (type(max_tokens) is int and max_tokens > 4):
        body["max_tokens"] = 4
    return body


MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "x"]),
                                     "content": st.one_of(TEXT, st.just([{"type": "text", "text": "hi"}]),
                                                          ANY_JSON)}),
             min_size=0, max_size=3),
    ANY_JSON,
)
PROMPTS = st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(-2, 50000), max_size=5),
                    st.lists(st.lists(st.integers(0, 100), max_size=3), max_size=3), ANY_JSON)
MODELS = st.one_of(st.just(MODEL), st.just(MODEL), st.text(max_size=300), ANY_JSON)


def assert_sane(status: int, resp: dict | str, stream: bool) -> None:
    assert status < 500, resp
    if status >= 400:
        assert_envelope(resp)
    elif stream:
        events = [line[6:] for line in resp.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            assert "internal_error" not in event, event


def send(base: str, route: str, body: dict) -> tuple[int, dict | str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{base}{route}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read().decode()
            return r.status, raw if body.get("stream") is True else json.loads(raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(model=MODELS, messages=MESSAGES, extra=sampling_fields())
def test_fuzz_chat_completions(stack, model, messages, extra):
    body = capped({"model": model, "messages": messages, **extra})
    status, resp = send(stack, "/v1/chat/completions", body)
    assert_sane(status, resp, body.get("stream") is True)


@FUZZ
@given(model=MODELS, prompt=PROMPTS, extra=sampling_fields(), echo=st.one_of(st.booleans(), ANY_JSON))
def test_fuzz_completions(stack, model, prompt, extra, echo):
    body = capped({"model": model, "prompt": prompt, "echo": echo, **extra})
    status, resp = send(stack, "/v1/completions", body)
    assert_sane(status, resp, body.get("stream") is True)


VOCAB = 49152  # SmolLM2's


def valid_sampling():
    """Every field within what the API accepts, edges included: each body must be served."""
    tiny = st.sampled_from([1e-300, 5e-324, 1e-38, 1e-6])
    return st.fixed_dictionaries({"max_tokens": st.integers(1, 4)}, optional={
        "temperature": st.one_of(st.floats(0, 2), tiny),
        "top_p": st.one_of(st.floats(1e-300, 1), tiny),
        "top_k": st.integers(-1, 10**6),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.one_of(st.floats(1e-300, 1e300), tiny),
        "seed": st.integers(-(2**63), 2**63 - 4),
        "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
        "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=8),
        "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=4),
        "n": st.integers(1, 3),
        "stream": st.booleans(),
        "ignore_eos": st.booleans(),
        "min_tokens": st.integers(0, 4),
    }).map(lambda b: {**b, "min_tokens": min(b.get("min_tokens", 0), b["max_tokens"])})


VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": st.text(max_size=40)}), min_size=1, max_size=3)
VALID_PROMPTS = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                      max_size=6))


@FUZZ
@given(messages=VALID_MESSAGES, extra=valid_sampling())
def test_fuzz_valid_chat_bodies_are_all_served(stack, messages, extra):
    status, resp = send(stack, "/v1/chat/completions", {"model": MODEL, "messages": messages, **extra})
    assert status == 200, resp
    assert_sane(status, resp, extra.get("stream") is True)


@FUZZ
@given(prompt=VALID_PROMPTS, extra=valid_sampling())
def test_fuzz_valid_completion_bodies_are_all_served(stack, prompt, extra):
    status, resp = send(stack, "/v1/completions", {"model": MODEL, "prompt": prompt, **extra})
    assert status == 200, resp
    assert_sane(status, resp, extra.get("stream") is True)


def test_after_the_fuzz_the_fabric_is_healthy(stack, client):
    assert_healthy(stack, client)


# -- the token plane --------------------------------------------------------------------------


def test_chunks_from_anyone_but_the_serving_worker_are_dropped(stack, client, fabric):
    """A forged chunk on a request's inbox, from another worker id, changes nothing."""
    import asyncio

    import nats

    from chatfabric.proto import subjects
    from chatfabric.proto.messages import DeltaChunk, decode_chunks, encode_chunks

    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], temperature=0,
                  max_tokens=30)
    expected = client.chat.completions.create(**kwargs).choices[0].message.content

    async def forge_into_next_request():
        nc = await nats.connect(fabric.nats_url)
        try:
            sub = await nc.subscribe(f"{subjects.INBOX_PREFIX}.>")
            call = asyncio.create_task(asyncio.to_thread(client.chat.completions.create, **kwargs))
            chunk = None
            while chunk is None:
                msg = await sub.next_msg(timeout=60)
                chunk = next((c for c in decode_chunks(msg.data) if isinstance(c, DeltaChunk)), None)
            forged = [DeltaChunk(request_id=chunk.request_id, seq=seq, worker_id="intruder",
                                 attempt=chunk.attempt, text=" FORGED", token_count=1)
                      for seq in range(chunk.seq + 1, chunk.seq + 4)]
            await nc.publish(msg.subject, encode_chunks(forged))
            return await call
        finally:
            await nc.close()

    reply = asyncio.run(forge_into_next_request())
    assert reply.choices[0].message.content == expected
    assert "FORGED" not in reply.choices[0].message.content
