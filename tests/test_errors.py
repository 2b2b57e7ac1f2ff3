"""Bad input gets the right status and the OpenAI error envelope, and loses nothing."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from chatfabric.proto import subjects
from chatfabric.proto.messages import ErrorChunk, FinalChunk, GenerationRequest, decode_chunks, encode
from conftest import MODEL

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def assert_envelope(body: dict, *, param=None, code=None, contains=None):
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if contains is not None:
        assert contains in err["message"]


@pytest.mark.parametrize(
    "body, param, contains",
    [
        ({"model": MODEL}, "messages", "required"),
        ({"model": MODEL, "messages": []}, "messages", None),
        ({"model": MODEL, "messages": FRANCE, "temperature": 3}, "temperature", None),
        ({"model": MODEL, "messages": FRANCE, "top_p": 0}, "top_p", None),
        ({"model": MODEL, "messages": FRANCE, "max_tokens": 0}, "max_tokens", None),
        ({"model": MODEL, "messages": FRANCE, "n": 0}, "n", None),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", None),
        ({"model": MODEL, "messages": FRANCE, "stop": ["a"] * 17}, "stop", "at most 16"),
        ({"model": MODEL, "messages": FRANCE, "logprobs": True}, None, "logprobs"),
        ({"model": MODEL, "messages": FRANCE, "tools": [{"type": "function"}]}, None, "tool"),
        ({"model": MODEL, "messages": FRANCE, "stream_options": {"include_usage": True}}, None, "stream"),
        ({"messages": FRANCE}, "model", "required"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, "text parts"),
    ],
)
def test_invalid_chat_requests_are_400(stack, body, param, contains):
    status, _, resp = post(f"{stack}/v1/chat/completions", json.dumps(body).encode())
    assert status == 400
    assert resp["error"]["type"] == "invalid_request_error"
    assert_envelope(resp, param=param, contains=contains)


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"model": MODEL, "prompt": ""}, "empty"),
        ({"model": MODEL, "prompt": []}, "empty"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 2}, "logprobs"),
        ({"model": MODEL, "prompt": [1, 2], "echo": True}, "echo"),
    ],
)
def test_invalid_completion_requests_are_400(stack, body, contains):
    status, _, resp = post(f"{stack}/v1/completions", json.dumps(body).encode())
    assert status == 400
    assert_envelope(resp, contains=contains)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", "\"caf\xe9\"".encode("latin-1")])
def test_malformed_bodies_are_400_never_500(stack, raw):
    status, _, resp = post(f"{stack}/v1/chat/completions", raw)
    assert status == 400
    assert_envelope(resp)


def test_out_of_range_token_ids_are_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[1, 10**7], max_tokens=2)
    assert "out of range" in info.value.message


def test_unknown_model_is_404_listing_models(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert info.value.status_code == 404
    assert MODEL in info.value.message
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_unknown_route_is_404_envelope(stack):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{stack}/v1/nothing-here", timeout=10)
    assert info.value.code == 404
    assert_envelope(json.loads(info.value.read()))


def test_body_too_large_is_413(stack):
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]})
    status, _, resp = post(f"{stack}/v1/chat/completions", big.encode())
    assert status == 413
    assert_envelope(resp, code="request_too_large", contains="limit")


def test_context_too_long_is_400_with_openai_message(client):
    long_prompt = "hello " * 9000
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert "maximum context length is 8192 tokens" in info.value.message
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # streaming gets the status too, before any data
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}],
                                            stream=True))


def test_max_tokens_is_clamped_to_the_context(fabric, stack, client, tokenizer):
    """A worker serving a shorter context than its model's (--max-model-len) says so in
    /v1/models, clamps max_tokens to what the prompt leaves of it, and rejects what does not fit
    (the same rule as at the model's own context, without generating thousands of tokens)."""
    model, context = "clamped-context", 320
    fabric.worker(model, "--max-model-len", str(context), "--max-concurrency", "2")
    assert fabric.wait_workers(stack, model, 1)["max_model_len"] == context
    prompt = "hello " * 250
    n_prompt = len(tokenizer(prompt)["input_ids"])
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=100_000, extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == context - n_prompt
    assert resp.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="hello " * context, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    assert f"maximum context length is {context} tokens" in info.value.message


def test_api_keys(fabric, stack):
    from openai import OpenAI

    _, base = fabric.gateway("--api-keys", "k-one,k-two")
    for key in ("wrong", ""):
        bad = OpenAI(base_url=f"{base}/v1", api_key=key or "x", max_retries=0,
                     default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    good = OpenAI(base_url=f"{base}/v1", api_key="k-two", max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2).usage.completion_tokens == 2
    # /health tells anyone the status; which workers serve what is for key holders
    anonymous = json.loads(urllib.request.urlopen(f"{base}/health", timeout=5).read())
    assert anonymous == {"status": "ok", "nats": "connected"}
    keyed = urllib.request.Request(f"{base}/health", headers={"Authorization": "Bearer k-one"})
    detailed = json.loads(urllib.request.urlopen(keyed, timeout=5).read())
    assert MODEL in detailed["models"] and detailed["workers"]


async def _publish_raw(nats_url: str, model: str, payload: bytes, reply: str):
    """Publish straight into the GEN stream (bypassing the gateway) and collect the reply chunks."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe(reply)
        await nc.jetstream().publish(subjects.gen_subject(model), payload)
        chunks = []
        while True:
            msg = await sub.next_msg(timeout=60)
            chunks.extend(decode_chunks(msg.data))
            if isinstance(chunks[-1], (FinalChunk, ErrorChunk)):
                return chunks
    finally:
        await nc.close()


def test_malformed_bus_message_gets_error_chunk_and_worker_survives(fabric, client):
    bad = json.dumps({"v": 1, "request_id": "bad1", "model": MODEL, "reply_to": "_INBOX.test.bad1",
                      "deadline": "tomorrow", "prompt": "hi"}).encode()
    chunks = asyncio.run(_publish_raw(fabric.nats_url, MODEL, bad, "_INBOX.test.bad1"))
    assert isinstance(chunks[-1], ErrorChunk) and chunks[-1].code == "invalid_request"
    assert "deadline" in chunks[-1].message
    future = json.dumps({"v": 2, "request_id": "bad2", "reply_to": "_INBOX.test.bad2"}).encode()
    chunks = asyncio.run(_publish_raw(fabric.nats_url, MODEL, future, "_INBOX.test.bad2"))
    assert chunks[-1].code == "invalid_request" and "v:" in chunks[-1].message
    # the worker still serves
    assert client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2).usage.completion_tokens == 2


def test_expired_request_is_dropped_not_served(fabric):
    req = GenerationRequest(request_id="late1", model=MODEL, prompt="hi", reply_to="_INBOX.test.late1",
                            deadline=time.time() - 1)
    chunks = asyncio.run(_publish_raw(fabric.nats_url, MODEL, encode(req), "_INBOX.test.late1"))
    assert [type(c) for c in chunks] == [ErrorChunk]
    assert chunks[0].code == "deadline_exceeded"
