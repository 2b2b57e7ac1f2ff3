"""The OpenAI API through the real gateway, NATS and a SmolLM2 worker, with the `openai` SDK."""

from __future__ import annotations

import pytest
import torch

from conftest import MODEL

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer):
    """Greedy generation by transformers' own `generate`, to compare the fabric against."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def run(messages=None, prompt=None, max_new_tokens=64):
        if messages is not None:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2
            )
        new = out[0, len(ids):].tolist()
        return {"prompt_tokens": len(ids), "ids": new, "text": tokenizer.decode(new, skip_special_tokens=True)}

    return run


def test_chat_answers_and_matches_transformers(client, reference):
    resp = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    ref = reference(messages=FRANCE)
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.content == ref["text"]
    assert choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens == ref["prompt_tokens"]
    assert resp.usage.completion_tokens == len(ref["ids"])  # the end-of-turn token counts
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.object == "chat.completion" and resp.model == MODEL


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_matches_transformers(client, reference):
    prompt = "The three primary colors are"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ref = reference(prompt=prompt, max_new_tokens=12)
    assert resp.choices[0].text == ref["text"]
    assert resp.usage.prompt_tokens == ref["prompt_tokens"]
    assert resp.usage.completion_tokens == len(ref["ids"])
    assert resp.object == "text_completion"


def test_completion_defaults_to_16_tokens_and_length(client):
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16
    assert resp.choices[0].finish_reason == "length"


def test_completion_stream_prompt_list_and_echo(client):
    prompts = ["Water boils at", "The sun is a"]
    whole = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, echo=True)
    assert [c.index for c in whole.choices] == [0, 1]
    for choice, prompt in zip(whole.choices, prompts):
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                            echo=True, stream=True))
    for i in range(2):
        streamed = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert streamed == whole.choices[i].text


def test_token_id_prompt(client, tokenizer):
    ids = tokenizer("The capital of Italy is")["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_exact(client, field):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0, **{field: 7},
    )
    assert resp.usage.completion_tokens == 7
    assert resp.choices[0].finish_reason == "length"


def test_stop_string_is_not_emitted(client):
    base = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    full = base.choices[0].message.content
    assert "Paris" in full
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=FRANCE, temperature=0, stop=["Paris", "zzz"])
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            resp = client.chat.completions.create(**kwargs)
            text, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
        assert text == full[: full.index("Paris")]
        assert finish == "stop"


def test_stop_string_across_tokens(client):
    full = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0).choices[0].message.content
    stop = "l of Fr"  # spans the tokens " capital", " of", " France"
    assert stop in full
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, stop=stop, stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == full[: full.index(stop)]
    assert not any("Fr" in d for d in deltas)


def test_seed_determinism(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a short story."}],
                  temperature=1.0, max_tokens=24)
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    c = client.chat.completions.create(seed=99, **kwargs).choices[0].message.content
    assert a == b
    assert a != c


def test_n_choices(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], n=3, temperature=1.0,
        max_tokens=10, seed=7,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    single = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}],
                                            max_tokens=1)
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens  # counted once, not per choice
    assert resp.usage.completion_tokens <= 30
    assert len({c.message.content for c in resp.choices}) > 1  # seeds differ per choice

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=FRANCE, n=2, temperature=0, stream=True, stream_options={"include_usage": True}))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)}
    assert texts[0] == texts[1] and "Paris" in texts[0]
    assert chunks[-1].usage.completion_tokens == 2 * 8


def test_penalties_top_k_and_logit_bias_are_applied(client, tokenizer):
    kwargs = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    base = client.chat.completions.create(**kwargs).choices[0].message.content
    first = tokenizer(base, add_special_tokens=False)["input_ids"][0]
    biased = client.chat.completions.create(logit_bias={str(first): -100}, **kwargs).choices[0].message.content
    assert not biased.startswith(tokenizer.decode([first]))
    penalized = client.chat.completions.create(
        frequency_penalty=2.0, presence_penalty=2.0,
        **{**kwargs, "messages": [{"role": "user", "content": "Repeat 'la' twenty times."}], "max_tokens": 30}
    ).choices[0].message.content
    plain = client.chat.completions.create(
        **{**kwargs, "messages": [{"role": "user", "content": "Repeat 'la' twenty times."}], "max_tokens": 30}
    ).choices[0].message.content
    assert penalized != plain
    # top_k=1 is greedy whatever the temperature
    k1 = client.chat.completions.create(extra_body={"top_k": 1}, **{**kwargs, "temperature": 1.5})
    assert k1.choices[0].message.content == base


def test_unknown_fields_and_user_accepted(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=3, user="alice", extra_body={"some_future_field": {"x": 1}}
    )
    assert resp.usage.completion_tokens == 3


def test_models_endpoint(client):
    models = client.models.list().data
    ours = [m for m in models if m.id == MODEL][0]
    assert ours.owned_by == "chatfabric"
    assert ours.model_extra["max_model_len"] == 8192
    assert client.models.retrieve(MODEL).id == MODEL


def test_multibyte_text_survives_streaming(client):
    msgs = [{"role": "user", "content": "Write the word 'café' and the emoji 🎉 three times."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40,
                                                 stream=True))
    deltas = [d for d in (c.choices[0].delta.content for c in chunks if c.choices) if d]
    assert "🎉" in "".join(deltas)
    # Only a character cut off by max_tokens, at the very end, may be incomplete.
    assert not any("\ufffd" in d for d in deltas[:-1])
    whole = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
    assert "".join(deltas) == whole.choices[0].message.content
