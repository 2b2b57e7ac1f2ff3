"""Loss masks and data files: exactly the assistant's tokens (and each turn's end) are trained,
with the serving templates; bad files are errors naming their line."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chatfabric.proto.messages import ChatMessage
from chatfabric.models.templates import TEMPLATES, PromptBuilder
from chatfabric.trainer.data import DataError, load_conversations
from chatfabric.trainer.masks import IGNORE, Sample, Skip, render_with_mask, trained_text
from shared_data import SHAREGPT_FILE, shared_file

SHAREGPT = str(shared_file(SHAREGPT_FILE))


def m(role, content):
    return ChatMessage(role=role, content=content)


def test_mask_of_a_known_conversation_position_by_position(tokenizer):
    sample = render_with_mask(PromptBuilder(tokenizer), [m("user", "Hi"), m("assistant", "Hello!")], 2048)
    # <|im_start|>system\n...<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n = 31 tokens,
    # then 'Hello' '!' '<|im_end|>': ids 19556, 17, 2 (checked by decoding each token)
    assert len(sample.input_ids) == 34
    assert sample.labels[:31] == (IGNORE,) * 31
    assert sample.labels[31:] == (19556, 17, 2) == sample.input_ids[31:]
    assert tokenizer.decode(sample.input_ids[28:31]) == "assistant\n"
    assert trained_text(tokenizer, sample) == ["Hello!<|im_end|>"]


CONVERSATION = [m("system", "Be brief."), m("user", "Name a colour."), m("assistant", "Blue."),
                m("user", "Another?"), m("assistant", ""), m("user", "And one more?"), m("assistant", "Green, then.")]


@pytest.mark.parametrize("template", [None, *sorted(TEMPLATES)])
def test_every_template_trains_exactly_the_answers(tokenizer, template):
    prompts = PromptBuilder(tokenizer, template)
    sample = render_with_mask(prompts, CONVERSATION, 4096)
    assert isinstance(sample, Sample), sample
    eos = tokenizer.eos_token
    runs = [r.replace(eos, "").replace("<|im_end|>", "").strip() for r in trained_text(tokenizer, sample)]
    # the empty answer still trains its end of turn, so it is a run of its own
    assert runs == ["Blue.", "", "Green, then."]
    # the prompt before the last answer is what a worker serves, token for token
    served = prompts.chat_ids(CONVERSATION[:-1])
    assert list(sample.input_ids[: len(served)]) == served
    last = [t for t, label in zip(sample.input_ids[len(served):], sample.labels[len(served):]) if label != IGNORE]
    assert tokenizer.decode(last).replace(tokenizer.eos_token, "").replace("<|im_end|>", "").strip() == "Green, then."


def test_max_length_cuts_and_skips(tokenizer):
    prompts = PromptBuilder(tokenizer)
    whole = render_with_mask(prompts, CONVERSATION, 4096)
    cut = render_with_mask(prompts, CONVERSATION, 40)
    assert cut.input_ids == whole.input_ids[:40] and cut.labels == whole.labels[:40]
    skipped = render_with_mask(prompts, CONVERSATION, 10, "r1")
    assert isinstance(skipped, Skip) and skipped.reason.startswith("cut by max_length")


def test_sharegpt_file_renders_without_mismatch(tokenizer):
    conversations = load_conversations(SHAREGPT)[:50]
    prompts = PromptBuilder(tokenizer)
    results = [render_with_mask(prompts, c.messages, 2048, c.id) for c in conversations]
    assert all(isinstance(r, Sample) for r in results)


def test_openai_messages_and_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n\n" + json.dumps({"id": "x", "conversations": [{"from": "human", "value": "c"},
                                                                         {"from": "gpt", "value": "d"}]}) + "\n")
    conversations = load_conversations(path)
    assert [c.id for c in conversations] == ["0", "x"] and [c.line for c in conversations] == [1, 3]


@pytest.mark.parametrize("text, line, words", [
    ('{"messages": []}\n', 1, "non-empty list"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n{"oops"\n', 2,
     "not valid JSON"),
    ('[\n {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},\n'
     ' {"id": "r7", "conversations": [{"from": "gpt", "value": "a"}]}\n]', 3, "expected user"),
    ('{"id": 5, "conversations": [{"from": "robot", "value": "a"}]}\n', 1, "'from' must be"),
])
def test_bad_files_name_the_line(tmp_path, text, line, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert err.value.line == line and words in str(err.value) and f"bad.json:{line}" in str(err.value)


TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "bot"]), "value": st.text(max_size=5)})
RECORD = st.one_of(st.fixed_dictionaries({"conversations": st.lists(TURN, max_size=4)}), st.text(max_size=8),
                   st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(RECORD.map(json.dumps), st.text(max_size=10)), min_size=1, max_size=6))
def test_any_jsonl_file_loads_or_names_its_line(tmp_path, lines):
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines))
    try:
        conversations = load_conversations(path)
    except DataError as err:
        assert err.line is None or 1 <= err.line <= len(lines)
        assert str(path) in str(err)
    else:
        assert all(any(msg.role == "assistant" for msg in c.messages) for c in conversations)
