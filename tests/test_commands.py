"""Every command as a user types it: `chatfabric ...` as a subprocess with realistic arguments,
against the session's one shared fabric (`fabric`, `stack`) where it needs one, checked by its
exit status and its output (a file that parses, a table with the expected rows).

Where each command is run this way:

| command | test |
| --- | --- |
| `up` | test_arena_browser, test_secured_fabric, test_install |
| `gateway`, `worker` | conftest's `Fabric` (every fabric test), test_cluster, test_install |
| `bench` | test_bench |
| `leaderboard` (file and stream) | test_leaderboard, test_closed_loop, and the README example below |
| `arena serve`, `arena export` | here |
| `arena import` | here, test_leaderboard |
| `judge run` | test_judge_fabric (on the fabric), test_judge (`--local`, outside the checkout) |
| `judge serve` | test_judge_fabric |
| `judge show` | test_judge |
| `judge agreement` | test_judge_agreement |
| `judge cancel` | here |
| `train sft` | here |
| `train dpo` | test_closed_loop |
| `train cancel`, `trainer serve` | test_train_fabric |
| `data check`, `clean`, `split`, `stats`, `masks` | here |
| `data from-arena` | test_train_data |

`test_every_documented_command_parses` holds every `chatfabric ...` line of the README and
docs/ to the current command line, so a renamed flag cannot leave a stale example.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import signal
import textwrap
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from chatfabric.deploy.cli import build_parser
from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.embedded import free_port
from chatfabric.proto.events import JobCancel
from chatfabric.proto.files import atomic_writer, write_atomic
from chatfabric.proto.replay import replay
from conftest import CHATFABRIC, http_json, wait_for
from shared_data import SHAREGPT_FILE, shared_file

REPO = Path(__file__).resolve().parents[1]


def chatfabric(*argv: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run([CHATFABRIC, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr


# -- the arena ---------------------------------------------------------------------------------------


def test_arena_import_then_export_to_a_file_and_to_standard_output(fabric, stack, tmp_path):
    tag = uuid.uuid4().hex[:8]  # the shared fabric's ARENA holds other tests' votes too
    battles = [{"model_a": f"a-{tag}", "model_b": f"b-{tag}", "winner": winner, "tstamp": 1_700_000_000 + n,
                "anony": anonymous} for n, (winner, anonymous) in
               enumerate([("model_a", True), ("tie", True), ("model_b", False)])]
    source = tmp_path / "battles.jsonl"
    source.write_text("".join(json.dumps(b) + "\n" for b in battles))
    imported = chatfabric("arena", "import", str(source), env=fabric.env)
    assert imported.returncode == 0 and "3 battles, 3 stored, 0 already in ARENA" in imported.stdout, imported.stderr

    out = tmp_path / "export.jsonl"
    exported = chatfabric("arena", "export", "--all", "--output", str(out), env=fabric.env)
    assert exported.returncode == 0, exported.stderr
    no_traceback(exported)
    ours = [r for r in jsonl(out) if r["model_a"] == f"a-{tag}"]
    assert [{k: r[k] for k in battles[0]} for r in ours] == battles
    assert re.search(rf"\d+ battles written to {re.escape(str(out))}", exported.stderr)
    assert not list(tmp_path.glob(".*partial")), list(tmp_path.iterdir())

    anonymous = chatfabric("arena", "export", "--no-conversations", env=fabric.env)
    assert anonymous.returncode == 0, anonymous.stderr
    rows = [json.loads(line) for line in anonymous.stdout.splitlines()]
    assert [r["winner"] for r in rows if r["model_a"] == f"a-{tag}"] == ["model_a", "tie"]
    assert all(r["anony"] for r in rows) and all("conversation_a" not in r for r in rows)

    nowhere = chatfabric("arena", "export", "--output", str(tmp_path / "no" / "such" / "x.jsonl"), env=fabric.env)
    assert nowhere.returncode == 2 and "x.jsonl" in nowhere.stderr
    no_traceback(nowhere)


def test_a_failed_write_leaves_the_old_file_whole_and_no_partial_file(tmp_path):
    target = tmp_path / "out.jsonl"
    write_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as f:
            f.write("half of a new")
            raise RuntimeError("the connection was lost")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    write_atomic(target, b"new\n")
    assert target.read_text() == "new\n"


def test_arena_serve_answers_its_health_check_and_stops_cleanly(fabric, stack, tmp_path):
    port = free_port()
    log = tmp_path / "arena.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([CHATFABRIC, "arena", "serve", "--port", str(port), "--gateway-url", f"{stack}/v1"],
                                env=fabric.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def healthy():
            assert proc.poll() is None, log.read_text()
            try:
                return http_json(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                return None

        assert wait_for(healthy, 180, "the arena's /healthz") == {"status": "ok"}
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "chatfabric arena" in page
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()


# -- the judge ---------------------------------------------------------------------------------------


def test_judge_cancel_records_the_cancel_on_the_bus(fabric, stack):
    name = f"mt_bench-single-{uuid.uuid4().hex[:12]}"
    since = time.time() - 1
    done = chatfabric("judge", "cancel", name, "--reason", "wrong judge model", env=fabric.env)
    assert done.returncode == 0 and done.stdout.strip() == f"cancel recorded for {name}", done.stderr

    async def stored():
        async with connect(BusConfig.from_env(url=fabric.nats_url), "test") as bus:
            return [item.message async for item in replay(bus, JobCancel, start_time=since)
                    if item.message.job_id == name]

    [cancel] = asyncio.run(stored())
    assert (cancel.kind, cancel.reason) == ("judge", "wrong judge model")


# -- training --------------------------------------------------------------------------------------


def conversations(tmp_path: Path, n: int) -> Path:
    records = json.loads(shared_file(SHAREGPT_FILE).read_text())[:n]
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_train_sft_lora_writes_an_adapter_and_only_its_own_output(model_dir, tmp_path):
    data, out = conversations(tmp_path, 8), tmp_path / "run"
    done = chatfabric("train", "sft", "--model-path", str(model_dir), "--data", str(data), "--lora",
                      "--max-length", "128", "--max-steps", "2", "--batch-size", "2", "--output", str(out),
                      timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"saved {out / 'final'}: steps 2," in done.stdout, done.stdout
    assert json.loads((out / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "final" / "adapter_model.safetensors").stat().st_size > 0
    chatter = done.stdout + done.stderr
    for noise in ("{'loss'", "Setting accelerator to CPU", "HTTP Request"):
        assert noise not in chatter, chatter[-3000:]
    no_traceback(done)


def test_data_commands_check_clean_split_stats_and_masks(model_dir, tmp_path):
    data = conversations(tmp_path, 20)
    check = chatfabric("data", "check", str(data))
    assert check.returncode == 0 and check.stdout.strip() == "20 records, no errors", check.stdout + check.stderr

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "x1", "conversations": [{"from": "gpt", "value": "first"}]}\nnot json\n')
    bad = chatfabric("data", "check", str(broken))
    assert bad.returncode == 1 and f"{broken}:1" in bad.stdout and f"{broken}:2" in bad.stdout, bad.stdout
    no_traceback(bad)

    cleaned = tmp_path / "clean.jsonl"
    clean = chatfabric("data", "clean", str(data), "--output", str(cleaned))
    assert clean.returncode == 0, clean.stderr
    assert 0 < len(jsonl(cleaned)) <= 20

    parts = tmp_path / "split.jsonl"
    split = chatfabric("data", "split", str(data), "--max-length", "256", "--model-path", str(model_dir),
                       "--output", str(parts))
    assert split.returncode == 0, split.stderr
    assert len(jsonl(parts)) >= 20

    stats = chatfabric("data", "stats", str(data), "--model-path", str(model_dir), "--json")
    assert stats.returncode == 0, stats.stderr
    numbers = json.loads(stats.stdout)
    assert numbers["conversations"] == numbers["samples"]["count"] == 20 and numbers["invalid"] == 0
    assert numbers["turns"]["user"] + numbers["turns"]["assistant"] == numbers["turns"]["total"]
    assert 0 < numbers["samples"]["trained_tokens"] < numbers["samples"]["tokens"]

    masks = tmp_path / "masks.jsonl"
    shown = chatfabric("data", "masks", "--data", str(data), "--output", str(masks), "--model-path", str(model_dir),
                       "--max-length", "512", "--color", "never")
    assert shown.returncode == 0, shown.stderr
    rows = jsonl(masks)
    assert f"{masks}: 20 samples kept" in shown.stdout and "trained (in [brackets])" in shown.stdout
    assert len(rows) == 20 and all(len(r["input_ids"]) == len(r["labels"]) for r in rows)
    assert any(label != -100 for r in rows for label in r["labels"])


# -- the documentation -----------------------------------------------------------------------------

DOCS = [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for each `chatfabric ...` line in a shell block of the docs, with
    continuations joined and comments, prompts and what follows `;`, `&&`, `|` or `&` cut off."""
    found = []
    for doc in DOCS:
        inside, pending, start = False, "", 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                inside = not inside and line.strip().lstrip("`") in ("sh", "bash", "shell", "console")
                continue
            if not inside:
                continue
            text = line.strip()
            if text.startswith("#"):
                continue
            if not pending:
                start = number
            pending += " " + text.removeprefix("$ ")
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            command, pending = pending.strip(), ""
            command = re.split(r"\s(?:;|&&|\|\|?|&)(?:\s|$)|\s#", command)[0].strip()
            if command.startswith("chatfabric "):
                found.append((f"{doc.relative_to(REPO)}:{start}", command))
    return found


def test_the_docs_show_commands_of_every_kind():
    commands = {shlex.split(c)[1] for _, c in documented_commands()}
    assert {"up", "worker", "leaderboard", "train", "judge"} <= commands, commands


@pytest.mark.parametrize("where,command", documented_commands(), ids=[w for w, _ in documented_commands()])
def test_every_documented_command_parses(where, command):
    """Each example as written parses with the current command line: a renamed or removed
    flag fails here (placeholders such as DIR or PATH stand for any value and parse too)."""
    args = shlex.split(command)[1:]
    try:
        build_parser().parse_args(args)
    except SystemExit as exit:
        raise AssertionError(f"{where}: `{command}` does not parse (exit {exit.code})") from None


INLINE = re.compile(r"`(chatfabric [^`]+)`")


def documented_synopses() -> list[tuple[str, str]]:
    """(where, text) for each `chatfabric ...` in inline code of the docs: usage synopses with
    placeholders and [optional] parts, which name flags but do not parse as a command line."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in INLINE.finditer(text):
            found.append((f"{doc.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}",
                          " ".join(match.group(1).split())))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("where,synopsis", documented_synopses(), ids=[w for w, _ in documented_synopses()])
def test_every_documented_flag_exists(where, synopsis):
    """Each flag a synopsis names belongs to its command (to one of them when it names
    alternatives, `sft|dpo`, or leaves the subcommand open, `train ... --submit`)."""
    words = synopsis.split()
    commands = _subparsers(build_parser())
    if len(words) < 2 or words[1] not in commands:
        return  # `chatfabric --help`, `chatfabric COMMAND --help`: no command named
    parsers = [commands[words[1]]]
    subcommands = _subparsers(parsers[0])
    if subcommands:
        named = [w for w in (words[2].split("|") if len(words) > 2 else ()) if w in subcommands]
        parsers = [subcommands[w] for w in named] or list(subcommands.values())
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", synopsis))
    known = {option for parser in parsers for option in _options(parser)}
    unknown = sorted(flags - known)
    assert not unknown, f"{where}: `{synopsis}` names {unknown}, which {[p.prog for p in parsers]} do not have"


def test_the_readme_leaderboard_example_runs_as_written(tmp_path):
    """The README's example on a file, with no fabric: its heredoc and its command, verbatim."""
    readme = (REPO / "README.md").read_text()
    start = readme.rindex("\n", 0, readme.index("cat > battles.jsonl <<'EOF'")) + 1
    block = textwrap.dedent(readme[start:readme.index("```", start)])  # as rendered: no list indent
    done = subprocess.run(["bash", "-e", "-c", block.replace("chatfabric ", f"{CHATFABRIC} ", 1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert {row["model"] for row in results["rows"]} == {"alpha", "beta", "gamma"}
    table = [m.group(1) for m in re.finditer(r"^\s*\d+\s+(\S+)\s+-?\d+\.\d", done.stdout, re.M)]
    assert table == [row["model"] for row in results["rows"]], done.stdout
    assert list((tmp_path / "plots").glob("*.png"))
