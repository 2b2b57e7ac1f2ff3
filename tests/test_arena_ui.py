"""The arena's handlers (arena/handlers.py, session.py, client.py) without a browser: the rules alone,
then whole rounds in this test's event loop against a real nats-server, the real gateway and two
synthetic workers ('syn-a', 'syn-b'), with the official `openai` SDK inside `arena.client`.
The browser test (test_arena_browser.py) plays the same through the page on the real model."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import random

import httpx
import openai
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatfabric.arena.config import ArenaConfig, add_args
from chatfabric.arena.handlers import HIDDEN, VOTES, Arena
from chatfabric.arena.client import Gateway, describe, draw_pair
from chatfabric.arena.session import Sampling, Limits, LimitReached, RateLimiter, Round, Side, Turn, client_id
from chatfabric.gateway.app import GatewayConfig, create_app
from chatfabric.proto.bus import connect
from chatfabric.proto.embedded import EmbeddedServer, free_port
from chatfabric.proto.events import ConversationLog, Feedback, Vote
from chatfabric.proto.replay import replay

from test_eventplane import Restartable
from test_inprocess import FAST, models, start_worker, wait_until

# -- rules ----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=8, unique=True),
       st.dictionaries(st.text(min_size=1, max_size=8), st.floats(0, 10), max_size=8), st.integers(0, 2**32))
def test_a_battle_never_draws_one_model_twice_nor_one_weighted_zero(live, weights, seed):
    eligible = [m for m in live if weights.get(m, 1.0) > 0]
    if len(eligible) < 2:
        with pytest.raises(ValueError):
            draw_pair(live, weights, random.Random(seed))
        return
    a, b = draw_pair(live, weights, random.Random(seed))
    assert a != b and {a, b} <= set(eligible)


def test_sides_are_shuffled_and_weights_are_honoured():
    rng = random.Random(7)
    pairs = collections.Counter(draw_pair(["x", "y", "z"], {"z": 4.0}, rng) for _ in range(3000))
    assert pairs[("x", "y")] > 0 and pairs[("y", "x")] > 0  # either side
    with_z = sum(n for pair, n in pairs.items() if "z" in pair)
    assert with_z / 3000 > 0.85  # z (weight 4) is in most battles; uniform weights would give 2/3


def test_limits_say_what_was_exceeded():
    limits = Limits(max_turns=2, max_input_chars=10)
    assert limits.check_input("  hi ", 0) == "hi"
    for text, turns, said in (("", 0, "Type a message"), ("x" * 11, 0, "11 characters"), ("ok", 2, "2 turns")):
        with pytest.raises(LimitReached, match=said):
            limits.check_input(text, turns)


def test_rate_limit_is_per_client_over_a_sliding_minute():
    now = [0.0]
    limit = RateLimiter(2, "votes", clock=lambda: now[0])
    limit.take("a"), limit.take("a"), limit.take("b")
    with pytest.raises(LimitReached, match="at most 2 a minute"):
        limit.take("a")
    now[0] = 60.0
    limit.take("a")


def test_clients_are_salted_hashes_never_addresses():
    a = client_id(b"salt", "203.0.113.7")
    assert "203.0.113.7" not in a and a == client_id(b"salt", "203.0.113.7")
    assert a != client_id(b"other", "203.0.113.7") and a != client_id(b"salt", "203.0.113.8")


def test_a_failed_turn_is_shown_but_never_sent_again_nor_logged():
    side = Side("m", Sampling())
    side.turns = [Turn("q1", "a1", done=True), Turn("q2", error="busy", done=True), Turn("q3")]
    assert side.request() == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                              {"role": "user", "content": "q3"}]
    assert {"role": "assistant", "content": "**Error:** busy"} in side.display()
    assert [m.content for m in side.log("c").messages] == ["q1", "a1"]


def test_votes_open_only_when_both_sides_finished_without_error():
    rnd = Round((Side("a", Sampling()), Side("b", Sampling())), anonymous=True)
    assert not rnd.can_vote
    rnd.ask("q")
    rnd.sides[0].turns[-1].done = True
    assert not rnd.can_vote and rnd.streaming
    rnd.sides[1].turns[-1].done, rnd.sides[1].turns[-1].error = True, "503"
    assert not rnd.can_vote
    rnd.retry_last()
    for side in rnd.sides:
        side.turns[-1].done = True
    assert rnd.can_vote


def _status_error(status: int, message: str) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://gw/v1/chat/completions")
    response = httpx.Response(status, request=request, json={"error": {"message": message}})
    cls = {429: openai.RateLimitError, 404: openai.NotFoundError, 400: openai.BadRequestError}.get(
        status, openai.InternalServerError)
    return cls(message, response=response, body={"message": message})


@pytest.mark.parametrize("status,message,said", [
    (429, "queue full", "busy right now (429: queue full)"),
    (503, "no worker", "No worker is serving m"),
    (504, "timed out", "did not answer in time"),
    (404, "model 'm' not found", "does not know m"),
    (400, "prompt exceeds the context of 2048 tokens", "too long for m's context"),
])
def test_gateway_errors_read_as_what_they_are(status, message, said):
    assert said in str(describe(_status_error(status, message), "m", "http://gw/v1"))


def test_connection_errors_name_the_gateway():
    err = openai.APIConnectionError(request=httpx.Request("GET", "http://gw/v1/models"))
    assert str(describe(err, "m", "http://gw/v1")) == "The gateway at http://gw/v1 is unreachable."


@pytest.mark.parametrize("argv,error", [
    (["--sampling-weight", "m"], "MODEL=WEIGHT"),
    (["--sampling-weight", "m=-1"], "MODEL=WEIGHT"),
    (["--sampling-weight", "m=nan"], "MODEL=WEIGHT"),
    (["--max-turns", "0"], "must be at least 1"),
    (["--rounds-per-minute", "x"], "not a whole number"),
    (["--leaderboard-refresh", "inf"], "positive number of seconds"),
])
def test_bad_flags_are_refused_by_name(argv, error, capsys):
    parser = argparse.ArgumentParser()
    add_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert error in capsys.readouterr().err


# -- whole rounds against the fabric --------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    with EmbeddedServer(port=free_port(), store_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@contextlib.asynccontextmanager
async def arena_on(url: str, tokenizer, models_served=("syn-a", "syn-b"), **config):
    """A gateway, synthetic workers and an Arena (on its own `arena` connection) over `url`."""
    bus_config = dataclasses.replace(FAST, url=url, registry_ttl=10.0)
    async with contextlib.AsyncExitStack() as stack:
        gw_bus = await stack.enter_async_context(connect(bus_config, "test-gateway", role="gateway"))
        server = TestServer(create_app(gw_bus, GatewayConfig(liveness_timeout=0.5, heartbeat_timeout=5)))
        await server.start_server()
        stack.push_async_callback(server.close)
        for model in models_served:
            await start_worker(stack, bus_config, tokenizer, model, token_delay=0.005)
        arena_bus = await stack.enter_async_context(connect(bus_config, "test-arena", role="arena"))
        gateway = Gateway(str(server.make_url("/v1")), None, timeout=30)
        stack.push_async_callback(gateway.close)
        await wait_until(lambda: models(gateway.client), set(models_served))
        yield Arena(arena_bus, gateway, ArenaConfig(sampling=Sampling(max_tokens=8), **config)), arena_bus


async def last(generator):
    view = None
    async for view in generator:
        pass
    return view


def interactive(view) -> list[bool]:
    return [button["interactive"] for button in view[6:]]


async def stored(bus, model):
    return [item.message async for item in replay(bus, model)]


async def test_a_battle_hides_the_models_until_the_vote_is_stored(nats_server, tokenizer):
    async with arena_on(nats_server.url, tokenizer) as (arena, bus):
        view = await last(arena.send("Hello there", None, None, None))
        rnd, chat_a, chat_b, names, status = view[:5]
        assert rnd.anonymous and {s.model for s in rnd.sides} == {"syn-a", "syn-b"}
        assert names == HIDDEN and "syn-" not in repr(view[1:6])
        assert interactive(view) == [True] * 4, (status, [s.turns for s in rnd.sides])
        assert chat_a[-1]["content"].strip() and chat_b[-1]["content"].strip()

        view = await last(arena.send("And then?", rnd, None, None))  # multi-turn
        assert rnd.turns == 2 and rnd.sides[0].request()[1]["role"] == "assistant"

        view = await arena.vote("model_b", rnd, None)
        assert "is recorded" in view[4] and rnd.sides[1].model in view[3] and rnd.sides[0].model in view[3]
        assert interactive(view) == [False] * 4
        vote = [v for v in await stored(bus, Vote) if v.id == rnd.vote_id]
        assert len(vote) == 1 and vote[0].winner == "model_b" and vote[0].anonymous
        assert (vote[0].model_a, vote[0].model_b) == (rnd.sides[0].model, rnd.sides[1].model)
        logs = {log.id: log for log in await stored(bus, ConversationLog)}
        assert [m.content for m in logs[vote[0].conversation_a].messages][::2] == ["Hello there", "And then?"]

        again = await arena.vote("model_a", rnd, None)  # a second click counts nothing
        assert "already recorded" in again[4]
        assert len([v for v in await stored(bus, Vote) if v.id == rnd.vote_id]) == 1
        follow_up = await last(arena.send("more?", rnd, None, None))
        assert "start a new round" in follow_up[4]


async def test_side_by_side_names_the_models_and_records_a_named_vote(nats_server, tokenizer):
    async with arena_on(nats_server.url, tokenizer) as (arena, bus):
        view = await last(arena.send("Hi", None, ("syn-b", "syn-a"), None))
        rnd = view[0]
        assert not rnd.anonymous and "syn-b" in view[3] and "syn-a" in view[3]
        view = await arena.vote("tie", rnd, None)
        vote = [v for v in await stored(bus, Vote) if v.id == rnd.vote_id]
        assert vote[0].winner == "tie" and not vote[0].anonymous and vote[0].model_a == "syn-b"

        missing = await last(arena.send("Hi", None, ("syn-a", "gone"), None))
        assert "Not served right now: gone" in missing[4] and missing[0] is None


async def test_one_live_model_is_not_a_battle_and_says_how_to_add_one(nats_server, tokenizer):
    async with arena_on(nats_server.url, tokenizer, models_served=("solo",)) as (arena, _):
        view = await last(arena.send("Hi", None, None, None))
        assert view[0] is None and "needs two live models" in view[4] and "chatfabric worker" in view[4]
        assert view[5] == {"__type__": "update"}  # the question stays in the box


async def test_limits_and_rate_limits_reach_the_user(nats_server, tokenizer):
    limits = Limits(max_turns=1, max_input_chars=20, rounds_per_minute=2, votes_per_minute=1)
    async with arena_on(nats_server.url, tokenizer, limits=limits) as (arena, _):
        assert "the limit is 20" in (await last(arena.send("x" * 21, None, None, None)))[4]
        rnd = (await last(arena.send("first", None, None, None)))[0]
        assert "reached its 1 turns" in (await last(arena.send("second", rnd, None, None)))[4]
        await last(arena.regenerate(rnd, None))  # the second round of the minute
        assert rnd.can_vote
        assert "Too many new rounds" in (await last(arena.send("again", None, None, None)))[4]


async def test_an_anonymous_error_does_not_name_the_model(nats_server, tokenizer):
    async with arena_on(nats_server.url, tokenizer) as (arena, _):
        rnd = Round((Side("syn-a", Sampling()), Side("not-served", Sampling())), anonymous=True)
        rnd.ask("hi")
        async for _ in arena.answer(rnd.sides, ("Model A", "Model B")):
            pass
        error = rnd.sides[1].turns[-1].error
        assert error and "not-served" not in error and "Model B" in error
        assert not rnd.can_vote


async def test_direct_chat_and_feedback_are_events(nats_server, tokenizer):
    async with arena_on(nats_server.url, tokenizer) as (arena, bus):
        view = await last(arena.chat("Hi", None, "syn-a", 0.0, 1.0, 8, None))
        side = view[0]
        assert view[1][-1]["role"] == "assistant" and view[1][-1]["content"]
        conversation = side.conversation
        assert "Recorded: upvote" in (await arena.feedback("upvote", side, None))[2]
        feedback = [f for f in await stored(bus, Feedback) if f.conversation == conversation]
        assert [(f.kind, f.model) for f in feedback] == [("upvote", "syn-a")]
        logs = [log for log in await stored(bus, ConversationLog) if log.id == conversation]
        assert logs and logs[0].messages[0].content == "Hi"
        bad = await last(arena.chat("Hi", side, "syn-a", 3.0, 1.0, 8, None))
        assert "temperature must be within" in bad[2]


async def test_a_vote_the_bus_did_not_confirm_is_said_so_and_a_retry_counts_once(tmp_path, tokenizer):
    srv = Restartable(tmp_path / "nats")
    try:
        async with arena_on(srv.url, tokenizer) as (arena, bus):
            rnd = (await last(arena.send("Hello", None, None, None)))[0]
            await asyncio.to_thread(srv.stop)
            failed = await arena.vote("model_a", rnd, None)
            assert "not recorded" in failed[4] and interactive(failed) == [True] * 4 and rnd.vote is None
            await restart_and_wait(srv, bus)
            done = await arena.vote("model_a", rnd, None)
            assert "is recorded" in done[4]
            assert [v.winner for v in await stored(bus, Vote) if v.id == rnd.vote_id] == ["model_a"]
    finally:
        srv.stop()


async def restart_and_wait(srv: Restartable, bus) -> None:
    back = asyncio.Event()

    async def reconnected() -> None:
        back.set()

    bus.on_reconnect(reconnected)
    await asyncio.to_thread(srv.start)
    await asyncio.wait_for(back.wait(), 15)


async def test_the_gateway_unreachable_is_said_so(nats_server, tokenizer):
    async with arena_on(nats_server.url, tokenizer) as (arena, _):
        arena.gateway = Gateway(f"http://127.0.0.1:{free_port()}/v1", None, timeout=5)
        try:
            view = await last(arena.send("Hi", None, None, None))
            assert "is unreachable" in view[4]
        finally:
            await arena.gateway.close()



@pytest.fixture(scope="module")
async def open_arena(nats_server, tokenizer):
    """One arena for generated inputs, with limits out of the way so every input reaches the checks."""
    limits = Limits(rounds_per_minute=100_000, votes_per_minute=100_000)
    async with arena_on(nats_server.url, tokenizer, limits=limits) as pair:
        yield pair


ANY = st.one_of(st.none(), st.booleans(), st.integers(-10, 100), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=20))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400), model=st.one_of(st.just("syn-a"), st.text(max_size=300)),
       temperature=ANY, top_p=ANY, max_tokens=ANY)
async def test_any_direct_chat_input_gets_an_answer_or_a_reason(open_arena, text, model, temperature, top_p, max_tokens):
    arena, _ = open_arena
    views = [view async for view in arena.chat(text, None, model, temperature, top_p, max_tokens, None)]
    side, chat, status, _ = views[-1]
    assert isinstance(status, str)
    assert status or (side is not None and side.finished and chat[-1]["role"] == "assistant")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400), a=st.one_of(st.just("syn-a"), st.text(max_size=300)),
       b=st.one_of(st.just("syn-b"), st.text(max_size=300)), winner=st.sampled_from([w for _, w in VOTES]))
async def test_any_side_by_side_input_gets_answers_or_a_reason(open_arena, text, a, b, winner):
    arena, bus = open_arena
    view = await last(arena.send(text, None, (a, b), None))
    rnd, status = view[0], view[4]
    if rnd is None:
        assert status  # refused, and said why
        return
    voted = await arena.vote(winner, rnd, None)
    assert "is recorded" in voted[4] or "must be complete" in voted[4]
