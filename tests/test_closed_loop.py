"""The closed loop, end to end on SmolLM2 with real processes, everything through the bus:
votes in ARENA -> `chatfabric train dpo --from-arena --publish-as smollm2-dpo` -> a worker serving
`artifact://smollm2-dpo` -> the model is listed in the gateway's /v1/models and drawn into the
arena's battles -> votes on it through the arena's handlers -> `chatfabric leaderboard` rates it.
The command sequence is the one in docs/training.md ("The closed loop")."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess

from chatfabric.arena.config import ArenaConfig
from chatfabric.arena.handlers import Arena
from chatfabric.arena.client import Gateway, draw_pair
from chatfabric.arena.session import Sampling, Limits
from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.events import ConversationLog, ModelPublished, Vote
from chatfabric.proto.messages import ChatMessage
from chatfabric.proto.replay import replay
from chatfabric.proto.subjects import EVENTS_PREFIX, model_token
from chatfabric.models.default_model import DEFAULT_MODEL_NAME

from conftest import CHATFABRIC, http_json, make_fabric

BASE, OTHER, NEW = "smollm2", "smollm2-v0", "smollm2-dpo"

# (question, the answer users preferred, the answer they voted against)
PREFERENCES = [
    ("What is the capital of France?", "The capital of France is Paris.", "I am not sure, maybe Lyon."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    ("What color is the sky on a clear day?", "It is blue on a clear day.", "The sky is green."),
    ("Name a prime number below ten.", "Seven is a prime number below ten.", "Nine is prime."),
]


def battle(question: str, answer_a: str, answer_b: str, winner: str, anonymous: bool = True) -> list:
    """One round as the arena stores it: both sides' conversation logs, then the vote."""
    logs = [ConversationLog(model=model, messages=(ChatMessage(role="user", content=question),
                                                   ChatMessage(role="assistant", content=answer)))
            for model, answer in ((BASE, answer_a), (OTHER, answer_b))]
    return [*logs, Vote(winner=winner, model_a=BASE, model_b=OTHER, anonymous=anonymous,
                        conversation_a=logs[0].id, conversation_b=logs[1].id)]


async def seed_votes(url: str) -> None:
    events = []
    for n, (question, good, bad) in enumerate(PREFERENCES):
        # the preferred answer on either side, so that both winners are read
        events += battle(question, good, bad, "model_a") if n % 2 else battle(question, bad, good, "model_b")
    # teach no preference: a tie, a both-bad, and a named (side-by-side) vote
    events += battle("Hi!", "Hello!", "Hey.", "tie")
    events += battle("Say nothing.", "...", "Nothing.", "tie (bothbad)")
    events += battle("Tell me a joke.", "Why did the chicken cross the road?", "No.", "model_a", anonymous=False)
    async with connect(BusConfig.from_env(url=url), "test-arena-votes") as bus:
        await bus.ensure_contract()
        for event in events:
            await bus.publish_event(event)


async def last_event(url: str, cls, subject: str):
    async with connect(BusConfig.from_env(url=url), "test") as bus:
        return await bus.last_event(cls, subject)


async def last(generator):
    view = None
    async for view in generator:
        pass
    return view


async def play_in_the_arena(url: str, gateway_url: str) -> dict:
    """Battles between the base and the new model through the Arena's handlers, voted on."""
    async with connect(BusConfig.from_env(url=url), "test-arena", role="arena") as bus:
        gateway = Gateway(f"{gateway_url}/v1", None, timeout=240)
        arena = Arena(bus, gateway, ArenaConfig(sampling=Sampling(max_tokens=6, temperature=0.0),
                                                      limits=Limits(rounds_per_minute=100, votes_per_minute=100)))
        try:
            live = await gateway.models()
            pool = {frozenset(draw_pair(live, {}, random.Random(seed))) for seed in range(20)}
            rounds = {}
            # anonymous battles: the pool is the gateway's live models, here exactly these two
            for winner, question in (("model_a", "What is the capital of France?"),
                                     ("model_b", "How many legs does a spider have?")):
                view = await last(arena.send(question, None, None, None))
                rnd, status = view[0], view[4]
                assert rnd is not None and rnd.anonymous and rnd.can_vote, status
                voted = await arena.vote(winner, rnd, None)
                assert "is recorded" in voted[4], voted[4]
                rounds[rnd.vote_id] = {s.model for s in rnd.sides}
            # a side-by-side round, the new model picked by name against the base
            view = await last(arena.send("Name a prime number below ten.", None, (NEW, BASE), None))
            rnd = view[0]
            assert rnd is not None and not rnd.anonymous and rnd.can_vote, view[4]
            assert NEW in view[3] and all(turn.answer for side in rnd.sides for turn in side.turns)
            assert "is recorded" in (await arena.vote("model_a", rnd, None))[4]
            rounds[rnd.vote_id] = {s.model for s in rnd.sides}
            votes = {item.message.id: item.message async for item in replay(bus, Vote)}
        finally:
            await gateway.close()
    return {"live": live, "pool": pool, "rounds": rounds, "votes": votes}


def run_cli(fabric, *args: str, timeout: float) -> str:
    done = subprocess.run([CHATFABRIC, *args], env=fabric.env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"chatfabric {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_votes_train_a_model_that_joins_the_arena_and_is_ranked(model_dir, tmp_path):
    # one thread per process: the trainer and two workers share the machine's cores, and
    # oversubscribed threads make a training step several times slower here
    fabric = make_fabric(model_dir, tmp_path, OMP_NUM_THREADS="1")
    # the worker's artifact cache (fetched adapter, merged model) stays in this test's folder
    artifact_env = {"HOME": str(tmp_path / "home"), "CHATFABRIC_MODEL_CACHE": str(model_dir.parent)}
    try:
        url = fabric.nats_url
        _, gateway = fabric.gateway("--heartbeat-timeout", "120")
        fabric.worker(BASE, "--max-concurrency", "2")

        # 1. votes in ARENA: 4 preferences, plus a tie, a both-bad and a named vote that teach nothing
        asyncio.run(seed_votes(url))

        # 2. DPO on the pairs those votes give, published to the artifacts store
        out = run_cli(fabric, "train", "dpo", "--model-path", DEFAULT_MODEL_NAME, "--from-arena", "--min-votes", "4",
                      "--output", str(tmp_path / "dpo"), "--max-steps", "2", "--batch-size", "4", "--max-length", "96",
                      "--lr", "5e-3", "--publish-as", NEW, "--nats-url", url, timeout=300)
        assert f"{len(PREFERENCES)} preference pairs from ARENA" in out, out
        assert f"published artifact://{NEW}" in out, out
        pairs = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
        assert {(p["prompt"][0]["content"], p["chosen"], p["rejected"]) for p in pairs} == set(PREFERENCES)
        published = asyncio.run(last_event(url, ModelPublished,
                                           f"{EVENTS_PREFIX}.model.published.{model_token(NEW)}"))
        assert published is not None and published.kind == "adapter" and published.card["method"] == "dpo"
        assert published.card["last_margin"] > published.card["first_margin"]  # it learned the preferences

        # 3. a worker serving artifact://smollm2-dpo, fetched through the bus
        fabric._spawn("worker", ["worker", "--model-path", f"artifact://{NEW}", "--model-name", NEW,
                                 "--nats-url", url, "--max-concurrency", "2"], artifact_env)
        fabric.wait_workers(gateway, BASE, 1, timeout=180)
        fabric.wait_workers(gateway, NEW, 1, timeout=240)
        listed = {m["id"] for m in http_json(f"{gateway}/v1/models")["data"]}
        assert {BASE, NEW} <= listed

        # 4. the arena draws it into battles, and users vote on it
        played = asyncio.run(play_in_the_arena(url, gateway))
        assert NEW in played["live"] and played["pool"] == {frozenset({BASE, NEW})}
        assert all(models == {BASE, NEW} for models in played["rounds"].values()), played["rounds"]
        assert set(played["rounds"]) <= set(played["votes"])

        # 5. the leaderboard ranks it
        results_path = tmp_path / "results.json"
        run_cli(fabric, "leaderboard", "--nats-url", url, "--bootstrap", "5", "--output", str(results_path),
                timeout=120)
        results = json.loads(results_path.read_text())
        rows = {row["model"]: row for row in results["rows"]}
        assert {BASE, OTHER, NEW} <= set(rows), rows
        assert rows[NEW]["votes"] == 2 and isinstance(rows[NEW]["rating"], float) and rows[NEW]["rank"] >= 1
        # 6 anonymous seed votes (ties included) and the 2 anonymous battles; the named ones are left out
        assert results["battles"] == 8
    finally:
        fabric.close()
