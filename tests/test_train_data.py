"""`chatfabric data check|clean|split|stats|from-arena|masks` on small hand-made files whose
answers are known: the lines of errors, what cleaning removes, where splitting cuts, the counts,
and masks equal to the trainer's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chatfabric.deploy.cli import main as chatfabric
from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.embedded import EmbeddedServer, free_port
from chatfabric.proto.events import ConversationLog, Vote
from chatfabric.proto.messages import ChatMessage
from chatfabric.models.templates import PromptBuilder
from chatfabric.trainer.data_tools import check, clean, from_arena, masks, split
from chatfabric.trainer.data_tools.records import scan
from chatfabric.trainer.data import load_conversations
from chatfabric.trainer.masks import IGNORE, Sample, render_with_mask, trained_text
from chatfabric.trainer.sft import build_samples


def sharegpt(id_, *turns, system=None):
    conv = ([{"from": "system", "value": system}] if system is not None else [])
    conv += [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    return {"id": id_, "conversations": conv}


def openai(id_, *turns):
    return {"id": id_, "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                    for i, t in enumerate(turns)]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_cli(capsys, *argv) -> tuple[int, str]:
    """`chatfabric data ...` in this process: (exit status, stdout)."""
    try:
        status = chatfabric(["data", *argv])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().out


# --- check ---------------------------------------------------------------------------------------------------------


def test_check_reports_every_error_with_its_line_and_record(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [
        sharegpt("ok1", "Hi", "Hello!"),                                              # 1
        sharegpt("order", "Hi", "Hello!", "More?"),                                   # 2 fine: ends with a question
        {"id": "r3", "conversations": [{"from": "gpt", "value": "Hi"}]},              # 3 starts with the assistant
        "",                                                                            # 4 blank
        "{not json",                                                                   # 5
        {"id": "r6", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # 6
        {"id": "r7", "conversations": [{"from": "alien", "value": "x"}]},             # 7 unknown role
        {"messages": [{"role": "user", "content": "no answer"}]},                      # 8 no assistant turn (id: 6)
        [1, 2],                                                                        # 9 not an object
        {"id": "r10", "text": "neither format"},                                      # 10
        {"id": "r11", "conversations": [{"from": ["human"], "value": "x"}]},          # 11 a role that is a list
    ])
    status, out = run_cli(capsys, "check", str(path))
    assert status == 1
    lines = out.splitlines()
    assert [line.split(":")[1].split(" ")[0] for line in lines[:-1]] == ["3", "5", "6", "7", "8", "9", "10", "11"]
    assert lines[0] == (f"{path}:3 (record r3): turn 0 is assistant, expected user (after an optional system message, "
                        "user and assistant turns alternate, starting with the user)")
    assert lines[1].startswith(f"{path}:5: not valid JSON")
    assert lines[2].startswith(f"{path}:6 (record r6): turn 1 is user, expected assistant")
    assert lines[4] == f"{path}:8 (record 6): no assistant turn: nothing to learn"
    assert lines[-1] == "10 records, 8 with errors"

    good = write_jsonl(tmp_path / "good.jsonl", [sharegpt("a", "Hi", "Hello!"), openai("b", "Q", "A")])
    assert run_cli(capsys, "check", str(good)) == (0, "2 records, no errors\n")


def test_check_json_array_lines_and_whole_file_errors(tmp_path, capsys):
    array = tmp_path / "data.json"
    array.write_text('[\n  {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},\n'
                     '  {"id": "b", "conversations": [{"from": "gpt", "value": "Yo"}]}\n]\n')
    status, out = run_cli(capsys, "check", str(array))
    assert status == 1 and out.splitlines()[0].startswith(f"{array}:3 (record b): turn 0 is assistant")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"id": "a"},\n  {"id": \n]\n')
    status, out = run_cli(capsys, "check", str(broken))
    assert status == 1 and out.splitlines()[0].startswith(f"{broken}:4: not valid JSON")
    status, out = run_cli(capsys, "check", str(tmp_path / "missing.jsonl"))
    assert status == 1 and out.splitlines() == [f"{tmp_path / 'missing.jsonl'}: no such file", "0 records, 1 with errors"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
ROLE = st.sampled_from(["human", "gpt", "system", "user", "assistant", "x"]) | JSON
TURN = st.fixed_dictionaries({}, optional={"from": ROLE, "value": JSON | st.text(max_size=8),
                                          "role": ROLE, "content": JSON | st.text(max_size=8)})
RECORD = st.fixed_dictionaries({}, optional={"id": JSON, "conversations": st.lists(TURN, max_size=4) | JSON,
                                             "messages": st.lists(TURN, max_size=4) | JSON})
LINE = RECORD.map(json.dumps) | JSON.map(json.dumps) | st.text(max_size=12).filter(lambda t: "\n" not in t and "\r" not in t)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, max_size=6))
def test_check_never_crashes_and_errors_name_a_line(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        records = scan(path)
        check.check([path], out=open(os.devnull, "w"))
    text_lines = "\n".join(lines).split("\n")
    filled = {n for n, line in enumerate(text_lines, start=1) if line.strip()}
    for record in records:
        if record.error is None:
            assert record.line in filled
        elif not record.whole_file:
            assert record.error.line in filled and str(record.error).startswith(f"{path}:{record.error.line}")
        else:  # a JSON array that does not parse, or no records at all
            assert record.error.line is None or 1 <= record.error.line <= len(text_lines)
    if not "\n".join(lines).lstrip().startswith("["):
        assert sorted(r.line for r in records if not r.whole_file) == sorted(filled)


# --- clean ---------------------------------------------------------------------------------------------------------


def test_clean_removes_what_it_says(tmp_path, capsys):
    path = write_jsonl(tmp_path / "raw.jsonl", [
        sharegpt("r1", "Hi", "Hello!"),
        sharegpt("r2", "Hi ", "Hello!"),                              # the same conversation as r1
        sharegpt("r3", "Q", "A", "Q", "A", "Next", "B"),               # an exchange repeated
        openai("r4", "x", "y", "z", "", "w", "v"),                     # an empty answer: cut before it
        sharegpt("r5", "Tell me", "That is Forbidden here."),          # a blocked word
        sharegpt("r6", "Привет, как дела?", "Хорошо, спасибо."),        # Cyrillic
        sharegpt("r7", "  ", "Hello!"),                                # nothing left
        {"id": "r8", "conversations": [{"from": "gpt", "value": "x"}]},  # invalid
        sharegpt("r9", "Hey", "Hey!", system=""),                     # an empty system message
        sharegpt("r10", "Is it unforbiddenly?", "Yes."),               # not the word itself
        sharegpt("r11", "Say it", "ok", system="Be brief."),
    ])
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("# one a line\nforbidden\n\nbad phrase\n")
    out = tmp_path / "clean.jsonl"
    status, text = run_cli(capsys, "clean", str(path), "--output", str(out), "--blocked-words", str(blocked),
                           "--keep-script", "latin")
    assert status == 0
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert list(rows) == ["r1", "r3", "r4", "r9", "r10", "r11"]
    assert [t["value"] for t in rows["r3"]["conversations"]] == ["Q", "A", "Next", "B"]
    assert rows["r4"]["messages"] == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert rows["r9"]["conversations"] == [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hey!"}]
    assert rows["r11"] == sharegpt("r11", "Say it", "ok", system="Be brief.")
    assert text.strip() == (f"{out}: kept 6 of 11 conversations; dropped: 1 blocked word, 1 duplicate, 1 empty, "
                            "1 invalid, 1 other script; turns removed: 3 cut with an empty turn, 2 duplicate, 2 empty")
    assert load_conversations(out)  # the trainer reads the result


def test_script_filter():
    latin = clean.parse_scripts("latin")
    assert clean.script_share("Hello, world", latin) == 1.0
    assert clean.script_share("Привет", latin) == 0.0
    assert clean.script_share("123 !", latin) == 1.0  # no letters: nothing to judge
    assert clean.script_share("日本語とカナ", clean.parse_scripts("japanese")) == 1.0


# --- split ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    return PromptBuilder(AutoTokenizer.from_pretrained(str(model_dir)))


def length(prompts, messages) -> int:
    sample = render_with_mask(prompts, messages, 10**9)
    assert isinstance(sample, Sample)
    return len(sample.input_ids)


def test_split_cuts_between_exchanges_to_fit(tmp_path, capsys, model_dir, prompts):
    turns = ["What is one plus one?", "Two.", "And two plus two?", "Four, of course.", "Three plus three?",
             "Six.", "Four plus four?", "Eight, which is two cubed."]
    long = sharegpt("long", *turns, system="Answer arithmetic questions.")
    messages = load_conversations(write_jsonl(tmp_path / "one.jsonl", [long]))[0].messages
    two_exchanges = length(prompts, messages[:5])
    assert length(prompts, messages[:7]) > two_exchanges  # so a limit of two exchanges cuts after turn 4
    path = write_jsonl(tmp_path / "data.jsonl", [sharegpt("short", "Hi", "Hello!"), long,
                                                 openai("huge", "Tell me a story. " * 40, "Once upon a time.")])
    out = tmp_path / "split.jsonl"
    status, text = run_cli(capsys, "split", str(path), "--model-path", str(model_dir), "--max-length",
                           str(two_exchanges), "--output", str(out))
    assert status == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["short", "long#0", "long#1", "huge"]
    assert rows[0] == sharegpt("short", "Hi", "Hello!")
    assert rows[3]["id"] == "huge" and len(rows[3]["messages"]) == 2  # one exchange too long: left whole
    pieces = load_conversations(out)[1:3]
    # where it cuts: after the second exchange, each piece with the system message
    assert [[m.content for m in p.messages] for p in pieces] == [
        ["Answer arithmetic questions.", *turns[:4]], ["Answer arithmetic questions.", *turns[4:]]]
    for piece in pieces:
        assert length(prompts, piece.messages) <= two_exchanges
    # joined back, the pieces are the conversation
    assert (pieces[0].messages[0],) + sum((p.messages[1:] for p in pieces), ()) == messages
    assert text.strip() == f"{out}: 3 conversations, 1 split, 4 written"


def test_split_points_are_as_long_as_they_can_be(tmp_path, prompts):
    turns = [w for n in range(6) for w in (f"Question number {n}?", "An answer " + "word " * n)]
    messages = load_conversations(write_jsonl(tmp_path / "d.jsonl", [openai("x", *turns, "trailing")]))[0].messages
    for limit in (60, 80, 120):
        pieces, too_long = split.split_points(prompts, messages, limit)
        assert too_long == 0
        assert [i for p in pieces for i in p] == list(range(len(messages)))
        for piece, after in zip(pieces, pieces[1:]):
            assert length(prompts, [messages[i] for i in piece]) <= limit
            assert length(prompts, [messages[i] for i in piece + after[:2]]) > limit  # the next exchange does not fit


# --- stats ---------------------------------------------------------------------------------------------------------


def test_stats_counts(tmp_path, capsys, model_dir):
    path = write_jsonl(tmp_path / "data.jsonl", [
        sharegpt("a", "Hi", "Hello!"),                                         # 34 tokens, 3 trained
        openai("b", "Name a colour.", "Blue."),                                 # 37 tokens, 3 trained
        sharegpt("c", "Name a colour.", "Blue.", "Another?", "Green.", system="Be brief."),
        {"id": "bad", "conversations": []},
    ])
    status, out = run_cli(capsys, "stats", str(path), "--model-path", str(model_dir), "--json", "--max-length", "36")
    assert status == 0
    stats = json.loads(out)
    assert stats["conversations"] == 3 and stats["invalid"] == 1
    assert stats["turns"] == {"total": 9, "system": 1, "user": 4, "assistant": 4}
    # content tokens: Hi 1, Hello! 2, Name a colour. 4, Blue. 2, Another? 2, Green. 2, Be brief. 3
    assert stats["tokens"] == {"total": 22, "system": 3, "user": 11, "assistant": 8}
    samples = stats["samples"]
    assert samples["count"] == 3 and samples["min"] == 34 and samples["trained_tokens"] == 3 + 3 + 3 + 3
    assert samples["over_max_length"] == 2  # 37 tokens and the long one
    assert stats["histogram"][0] == {"from": 0, "to": 128, "samples": 3}
    status, text = run_cli(capsys, "stats", str(path), "--model-path", str(model_dir))
    assert "turns           9 (system 1, user 4, assistant 4; 3.0 per conversation)" in text
    assert "      0-127        3 ########################################" in text.splitlines()


# --- masks ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [None, "chatml"])
def test_masks_are_the_trainers(tmp_path, capsys, model_dir, prompts, template):
    path = write_jsonl(tmp_path / "data.jsonl", [
        sharegpt("one", "Hi", "Hello!"),
        sharegpt("multi", "Name a colour.", "Blue.", "Another?", "", "And one more?", "Green, then.", system="Be brief."),
        openai("oa", "2+2?", "4"),
    ])
    out = tmp_path / "masks.jsonl"
    argv = ["masks", "--model-path", str(model_dir), "--data", str(path), "--output", str(out), "--show", "multi"]
    status, text = run_cli(capsys, *argv, *(["--template", template] if template else []))
    assert status == 0
    rows = read_jsonl(out)
    builder = PromptBuilder(prompts.tokenizer, template)
    trainer_samples, _ = build_samples(path, builder, 2048)
    assert [(r["id"], tuple(r["input_ids"]), tuple(r["labels"])) for r in rows] == [
        (s.id, s.input_ids, s.labels) for s in trainer_samples]
    conversations = load_conversations(path)
    for row, conversation in zip(rows, conversations):
        assert row["conversation"] == [m.model_dump() for m in conversation.messages]
        assert len(row["labels"]) == len(row["input_ids"])
        assert all(label in (IGNORE, token) for label, token in zip(row["labels"], row["input_ids"]))
    end = "<|im_end|>"  # SmolLM2's own template and ChatML end turns alike
    multi = next(s for s in trainer_samples if s.id == "multi")
    assert trained_text(prompts.tokenizer, multi) == [f"Blue.{end}", end, f"Green, then.{end}"]
    assert trained_text(prompts.tokenizer, trainer_samples[0]) == [f"Hello!{end}"]
    assert f"[Blue.{end}]" in text and f"[Green, then.{end}]" in text and "\x1b[" not in text
    assert text.splitlines()[0] == f"{out}: 3 samples kept"
    assert text.splitlines()[1] == f"sample multi: {len(multi.input_ids)} tokens, {multi.trained} trained (in [brackets]):"


def test_masks_cut_skips_and_colour(tmp_path, capsys, model_dir):
    path = write_jsonl(tmp_path / "data.jsonl", [sharegpt("a", "Hi", "Hello!"),
                                                 sharegpt("b", "Tell me a long story please " * 5, "No.")])
    out = tmp_path / "masks.jsonl"
    status, text = run_cli(capsys, "masks", "--model-path", str(model_dir), "--data", str(path), "--output", str(out),
                           "--max-length", "40", "--color", "always")
    assert status == 0
    assert [r["id"] for r in read_jsonl(out)] == ["a"]
    assert text.splitlines()[0] == f"{out}: 1 samples kept, skipped: 1 cut by max_length (e.g. record b)"
    assert f"{masks.TRAINED_ON}Hello!<|im_end|>{masks.TRAINED_OFF}" in text


# --- from-arena ----------------------------------------------------------------------------------------------------


def m(role, content):
    return ChatMessage(role=role, content=content)


async def battle(bus, name, question, answer_a, answer_b, winner, anonymous=True):
    logs = [ConversationLog(id=f"{name}-{side}", model=model, messages=(m("user", question), m("assistant", answer)))
            for side, model, answer in (("a", "alpha", answer_a), ("b", "beta", answer_b))]
    for log in logs:
        await bus.publish_event(log)
    await bus.publish_event(Vote(id=name, winner=winner, model_a="alpha", model_b="beta", anonymous=anonymous,
                                 conversation_a=logs[0].id, conversation_b=logs[1].id))


def cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatfabric.deploy.cli", "data", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CHATFABRIC_LOG_LEVEL": "WARNING"})


async def test_from_arena_exports_conversations_and_pairs(tmp_path):
    with EmbeddedServer(port=free_port(), store_dir=tmp_path / "nats") as server:
        async with connect(BusConfig(url=server.url), "test-data", role="gateway") as bus:
            await battle(bus, "v1", "Capital of France?", "Paris.", "Lyon.", "model_a")
            await battle(bus, "v2", "2+2?", "5", "4", "model_b")
            await battle(bus, "v3", "Hi", "Hello", "Hey", "tie")                 # no preference
            await battle(bus, "v4", "Best colour?", "Blue", "Red", "model_a", anonymous=False)  # named
            await bus.publish_event(ConversationLog(id="direct", model="alpha", messages=(m("user", "Yo"),)))
            winners, unusable = await from_arena.arena_conversations(bus, winners=True, anonymous_only=False)
            assert [r["id"] for r in winners] == ["v1-a", "v2-b", "v4-a"] and unusable == 0
            anonymous, _ = await from_arena.arena_conversations(bus, winners=True, model="beta")
            assert [r["id"] for r in anonymous] == ["v2-b"]
        pairs = cli("from-arena", "--pairs", "--output", str(tmp_path / "pairs.jsonl"), "--nats-url", server.url)
        conversations = cli("from-arena", "--output", str(tmp_path / "all.jsonl"), "--nats-url", server.url)
    for result in (pairs, conversations):
        assert result.returncode == 0, result.stderr
    assert read_jsonl(tmp_path / "pairs.jsonl") == [
        {"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}]
    assert pairs.stdout.strip() == f"2 preference pairs from ARENA written to {tmp_path / 'pairs.jsonl'}"
    exported = read_jsonl(tmp_path / "all.jsonl")
    assert [r["id"] for r in exported] == ["v1-a", "v1-b", "v2-a", "v2-b", "v3-a", "v3-b", "v4-a", "v4-b"]
    assert exported[0] == {"id": "v1-a", "model": "alpha", "messages": [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
    assert "(1 left out: not trainable)" in conversations.stdout  # the direct chat with no answer
    assert len(load_conversations(tmp_path / "all.jsonl")) == 8  # the trainer reads the export
