"""The leaderboard from the vote stream against a real nats-server: votes stored once, the
leaderboard as of a time, idempotent import and a round-tripping export, style from logged
conversations, `--follow` publishing snapshots, and a server restart that loses and doubles
nothing. Plus the command line on files: numbers checked against `arena.ratings` directly, and
clear errors for bad flags and files."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nats
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatfabric.arena import ratings
from chatfabric.arena.battles import anonymous_only, read_battles, sort_by_time
from chatfabric.arena.feed import FollowOptions, follow, latest_snapshot, read_arena
from chatfabric.arena.results import compute_results
from chatfabric.arena.transfer import VoteIds, export_records, file_events, import_file
from chatfabric.deploy.cli import main as chatfabric_main
from chatfabric.proto.bus import Bus, BusConfig, EventNotStored, connect
from chatfabric.proto.embedded import EmbeddedServer, free_port
from chatfabric.proto.events import Vote
from chatfabric.proto.replay import replay
from test_eventplane import Restartable

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "chatfabric.deploy.cli"]


def vote(winner="model_a", model_a="m-one", model_b="m-two", **fields) -> Vote:
    n = uuid.uuid4().hex[:12]
    return Vote(**{"id": f"v{n}", "winner": winner, "model_a": model_a, "model_b": model_b, "anonymous": True,
                   "conversation_a": f"ca{n}", "conversation_b": f"cb{n}", **fields})


def battle(n: int, **fields) -> dict:
    turns = [{"role": "user", "content": f"question {n}"}]
    record = {"model_a": "alpha", "model_b": "beta", "winner": ("model_a", "model_b", "tie")[n % 3],
              "tstamp": 1.7e9 + n + 0.25, "anony": n % 4 != 3}
    if n % 2 == 0:
        record["conversation_a"] = turns + [{"role": "assistant", "content": "# Title\n- one\n- two\n" * (n + 1)}]
        record["conversation_b"] = turns + [{"role": "assistant", "content": "plain"}]
    if n % 5 == 0:
        record["question_id"] = f"q{n:04d}"
    return record | fields


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def server(tmp_path):
    srv = Restartable(tmp_path / "nats")
    yield srv
    srv.stop()


@pytest.fixture
async def bus(server):
    async with connect(BusConfig(url=server.url), "test", role="gateway") as opened:
        yield opened


async def until(condition, timeout: float, what: str):
    """Wait for an async condition to hold, polling, with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := await condition():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- the stream -----------------------------------------------------------------------------------


async def test_a_vote_published_twice_counts_once(bus):
    cast = vote()
    assert not (await bus.publish_event(cast)).duplicate
    assert (await bus.publish_event(cast)).duplicate
    tally = await read_arena(bus)
    results = compute_results(tally.columns.battles(tally.style), rounds=5, last_seq=tally.last_seq)
    assert results.battles == 1 and [row.votes for row in results.rows] == [1, 1]
    assert results.last_seq == 1


async def test_as_of_gives_the_leaderboard_as_it_was(bus, server, tmp_path):
    for _ in range(4):
        await bus.publish_event(vote("model_a"))
    [*_, fourth] = [item async for item in replay(bus, Vote)]
    for _ in range(6):
        await bus.publish_event(vote("model_b"))
    as_of = fourth.time + 1e-6  # between the fourth and fifth vote's stored times
    earlier = compute_results((await read_arena(bus, until=as_of)).columns.battles(), rounds=5)
    now = compute_results((await read_arena(bus)).columns.battles(), rounds=5)
    assert (earlier.battles, now.battles) == (4, 10)
    assert earlier.rows[0].model == "m-one" and now.rows[0].model == "m-two"
    # the same through the command line, with the time in ISO 8601
    iso = datetime.datetime.fromtimestamp(as_of, datetime.timezone.utc).isoformat()
    out = tmp_path / "results.json"
    subprocess.run([*CLI, "leaderboard", "--nats-url", server.url, "--as-of", iso, "--bootstrap", "5",
                    "--output", str(out)], check=True, capture_output=True, timeout=60)
    stored = json.loads(out.read_text())
    assert stored["battles"] == 4 and stored["last_seq"] == fourth.seq
    assert stored["rows"][0]["model"] == "m-one" and stored["as_of"] == pytest.approx(as_of, abs=1e-5)


async def test_import_twice_adds_nothing_and_export_round_trips(bus, server, tmp_path):
    records = [battle(n) for n in range(12)]
    records.append(dict(records[1]))  # the same battle again: a second vote, not a duplicate
    path = write_jsonl(tmp_path / "clean_battle.jsonl", records)
    first = await import_file(bus, path)
    assert (first.battles, first.stored, first.present) == (13, 13, 0)
    again = subprocess.run([*CLI, "arena", "import", str(path), "--nats-url", server.url], check=True,
                           capture_output=True, text=True, timeout=60)
    assert "13 battles, 0 stored, 13 already in ARENA" in again.stdout
    assert len([item async for item in replay(bus, Vote)]) == 13

    exported = tmp_path / "export.jsonl"
    with open(exported, "w") as out:
        assert await export_records(bus, out, anonymous_only=False) == 13
    back = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "vote_id"} for r in back] == records
    assert (await import_file(bus, exported)).stored == 0  # the export names its votes

    # conversations were logged, so the style-controlled rating is there for those battles
    tally = await read_arena(bus)
    results = compute_results(tally.columns.battles(tally.style), rounds=5)
    anonymous = [r for r in records if r["anony"]]
    assert results.battles == len(anonymous)
    assert results.style_battles == sum("conversation_a" in r for r in anonymous)
    assert all(row.style_rating is not None for row in results.rows)
    from_file = compute_results(read_battles(path), rounds=5)
    assert [row.rating for row in results.rows] == pytest.approx([row.rating for row in from_file.rows])
    assert [row.style_rating for row in results.rows] == pytest.approx([row.style_rating for row in from_file.rows])


async def test_follow_picks_up_a_new_vote_within_seconds(bus):
    for winner in ("model_a", "model_b", "tie"):
        await bus.publish_event(vote(winner))
    stop = asyncio.Event()
    task = asyncio.create_task(follow(bus, FollowOptions(rounds=5, snapshot_interval=0.2), stop))
    try:
        async def battles_seen(count):
            snapshot = await latest_snapshot(bus)
            return snapshot if snapshot is not None and snapshot.battles == count else None

        before = await until(lambda: battles_seen(3), 20, "the first snapshot")
        await bus.publish_event(vote("model_b", model_b="m-three"))
        after = await until(lambda: battles_seen(4), 10, "the new vote in a snapshot")
        assert after.last_seq > before.last_seq
        assert {row.model for row in after.rows} == {"m-one", "m-two", "m-three"}
        elo = {row.model: row.online_elo for row in after.rows}
        assert elo["m-three"] > 1000 > elo["m-one"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_restart_while_votes_are_published_loses_none_and_doubles_none(server):
    casts = [vote(("model_a", "model_b", "tie")[n % 3]) for n in range(120)]
    async with connect(BusConfig(url=server.url), "test", role="gateway") as bus:
        stop = asyncio.Event()
        follower = asyncio.create_task(follow(bus, FollowOptions(rounds=5, snapshot_interval=0.2), stop))

        async def publish_all() -> None:
            for cast in casts:
                while True:
                    with contextlib.suppress(EventNotStored):  # the server is away: the same id again
                        await bus.publish_event(cast)
                        break

        publishing = asyncio.create_task(publish_all())
        await until(lambda: _stored_at_least(bus, 40), 20, "40 votes stored")
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(publishing, 40)
        stored = [item.message.id async for item in replay(bus, Vote)]
        assert sorted(stored) == sorted(c.id for c in casts)  # none lost, none twice

        async def all_counted():
            snapshot = await latest_snapshot(bus)
            return snapshot is not None and snapshot.battles == len(casts)

        await until(all_counted, 30, "the follower to count every vote once")
        stop.set()
        await asyncio.wait_for(follower, 10)
        snapshot = await latest_snapshot(bus)
        assert sum(row.votes for row in snapshot.rows) == 2 * len(casts)


async def _stored_at_least(bus, count: int) -> bool:
    with contextlib.suppress(Exception):  # the server may be restarting
        return (await bus.js.stream_info("ARENA")).state.messages >= count
    return False


# -- files and the command line -------------------------------------------------------------------


def test_leaderboard_from_a_file_matches_the_rating_functions(tmp_path):
    records = [battle(n) for n in range(30)] + [battle(n, model_b="gamma") for n in range(30, 45)]
    path = write_jsonl(tmp_path / "battles.jsonl", records)
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    shown = subprocess.run([*CLI, "leaderboard", "--from-file", str(path), "--bootstrap", "20", "--seed", "3",
                            "--output", str(out), "--plots", str(plots)],
                           check=True, capture_output=True, text=True, timeout=120)
    results = json.loads(out.read_text())
    table = sort_by_time(anonymous_only(read_battles(path)))
    bt, boot = ratings.bt_ratings(table), ratings.bootstrap_bt(table, 20, seed=3)
    elo = ratings.elo_ratings(table)
    for row in results["rows"]:
        i = table.models.index(row["model"])
        assert row["rating"] == pytest.approx(bt[i], abs=1e-9)
        assert (row["lower"], row["upper"]) == pytest.approx((boot.lower[i], boot.upper[i]), abs=1e-9)
        assert row["online_elo"] == pytest.approx(elo[i], abs=1e-9)
        assert row["votes"] == ratings.votes_per_model(table)[i]
        assert f"{row['model']}" in shown.stdout and f"{row['rating']:.1f}" in shown.stdout
    assert results["battles"] == len(table) and results["last_seq"] is None
    order = [table.models.index(m) for m in results["models"]]
    assert results["battle_count"] == ratings.battle_counts(table)[np.ix_(order, order)].tolist()
    predicted = ratings.predicted_win_rates(bt)[np.ix_(order, order)]
    assert np.array(results["predicted_win_rate"], float) == pytest.approx(predicted)
    for name in ("rating", "win_fraction", "battle_count"):
        assert (plots / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        page = (plots / f"{name}.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script" not in page


@pytest.mark.parametrize("flags, message", [
    (["--as-of", "yesterday"], "argument --as-of: 'yesterday' is neither an ISO 8601 time"),
    (["--as-of", "-5"], "argument --as-of: '-5' is not a time"),
    (["--bootstrap", "0"], "argument --bootstrap: must be at least 1"),
    (["--snapshot-interval", "nan"], "argument --snapshot-interval: must be a positive number"),
    (["--rating-system", "glicko"], "argument --rating-system: invalid choice: 'glicko'"),
    (["--anonymous-only", "--all"], "argument --all: not allowed with argument --anonymous-only"),
])
def test_bad_flags_exit_2_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        chatfabric_main(["leaderboard", *flags])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_bad_files_and_combinations_exit_2_saying_what_to_fix(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [battle(0)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [battle(0), battle(1, winner="model_c")])
    cases = [
        (["--from-file", str(tmp_path / "missing.jsonl")], "--from-file"),
        (["--from-file", str(bad)], "bad.jsonl:2: winner 'model_c' is not one of"),
        (["--from-file", str(good), "--follow"], "--follow reads the ARENA stream"),
        (["--from-file", str(good), "--plots", str(good)], f"--plots {good}: exists and is not a folder"),
        (["--from-file", str(good), "--output", str(tmp_path)], "--output"),
    ]
    for flags, message in cases:
        assert chatfabric_main(["leaderboard", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("chatfabric leaderboard: error:") and message in err, err


_name = st.sampled_from(["a", "b", "c", "org/m v1.5", "ü"])
_battle = st.fixed_dictionaries({
    "model_a": _name, "model_b": _name, "winner": st.sampled_from(["model_a", "model_b", "tie", "tie (bothbad)"]),
    "tstamp": st.floats(0, 2e9, allow_nan=False), "anony": st.booleans(),
}, optional={"question_id": st.sampled_from(["q1", "q2", "bad id!"]), "judge": st.text(max_size=5)}
).filter(lambda r: r["model_a"] != r["model_b"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_battle, max_size=12), as_array=st.booleans())
def test_vote_ids_are_stable_and_distinct_for_any_file(records, as_array, tmp_path):
    """The same file gives the same ids every time, one per battle (identical battles
    included), in either layout; each event pair carries the record's fields."""
    path = tmp_path / "battles.json"
    path.write_text(json.dumps(records, indent=1) if as_array else "".join(json.dumps(r) + "\n" for r in records))
    first = [vote.id for vote, _ in file_events(path)]
    assert first == [vote.id for vote, _ in file_events(path)]
    assert len(set(first)) == len(records)
    for (vote_event, _), record in zip(file_events(path), records):
        assert (vote_event.model_a, vote_event.winner, vote_event.at, vote_event.anonymous) == (
            record["model_a"], record["winner"], record["tstamp"], record["anony"])


def test_an_exported_vote_id_is_kept_and_a_repeated_question_id_is_not_reused():
    ids = VoteIds()
    assert ids({"vote_id": "abc"}) == "abc"
    assert ids({"question_id": "q1", "tstamp": 1}) == "fc-q1"
    assert ids({"question_id": "q1", "tstamp": 2}).startswith("imp-")


# -- roles ----------------------------------------------------------------------------------------


async def test_the_leaderboard_role_follows_and_publishes_and_the_arena_role_reads_it(tmp_path):
    """On a secured fabric: `leaderboard` replays, follows through its consumer and writes the
    snapshot; `arena` (the web UI) reads it; `leaderboard` cannot vote."""
    from chatfabric.proto import auth

    passwords = auth.ensure_credentials(tmp_path / "credentials")
    with EmbeddedServer(port=free_port(), store_dir=tmp_path / "nats",
                        authorization=auth.render_authorization(passwords)) as srv:
        config = BusConfig(url=srv.url)

        def as_role(role: str):
            return connect(config, role, auth=auth.NatsAuth.for_role(role, passwords), role=role)

        @contextlib.asynccontextmanager
        async def arena_bus():  # a plain connection: connect() also looks up the registry, not arena's to see
            nc = await nats.connect(srv.url, **auth.NatsAuth.for_role("arena", passwords).connect_options("arena"))
            try:
                yield Bus(nc, config)
            finally:
                await nc.close()

        async with as_role("gateway"), arena_bus() as arena:  # the gateway creates ARENA
            await arena.publish_event(vote())
            stop = asyncio.Event()
            async with as_role("leaderboard") as board:
                task = asyncio.create_task(follow(board, FollowOptions(rounds=5, snapshot_interval=0.2), stop))
                await arena.publish_event(vote("model_b"))

                async def both_counted():
                    snapshot = await latest_snapshot(arena)
                    return snapshot is not None and snapshot.battles == 2

                await until(both_counted, 20, "the arena role to read a snapshot of both votes")
                stop.set()
                await asyncio.wait_for(task, 10)
                with pytest.raises(EventNotStored):
                    await board.publish_event(vote(), retry_for=0.5)
