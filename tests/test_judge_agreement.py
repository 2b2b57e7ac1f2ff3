"""`chatfabric judge agreement`: pairwise judgments against human votes read from ARENA, on
hand-made votes whose agreement is counted by hand (FastChat's compute_agreement rules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from chatfabric.judge.agreement import agreement_table, human_verdicts, judge_verdicts
from chatfabric.judge.bench import load_bench
from chatfabric.judge.cli import arena_votes
from chatfabric.judge.results import pair_rows
from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.embedded import EmbeddedServer, free_port
from chatfabric.proto.events import ConversationLog, Vote
from chatfabric.proto.messages import ChatMessage

JUDGMENTS = [  # (question, turn, model_1, model_2, g1, g2): the judge's games
    (81, 1, "alpha", "beta", "model_1", "model_1"),  # alpha wins
    (82, 1, "alpha", "beta", "model_1", "model_2"),  # the two games disagree: a tie
    (81, 2, "beta", "alpha", "model_1", "model_1"),  # beta wins
]


def judgment_file(path) -> None:
    path.write_text("".join(json.dumps({"question_id": q, "turn": t, "model_1": m1, "model_2": m2,
                                        "g1_winner": g1, "g2_winner": g2, "judge": ["j", "pair-v2"]}) + "\n"
                            for q, t, m1, m2, g1, g2 in JUDGMENTS))


async def cast(bus, name: str, turns: list[str], model_a: str, model_b: str, winner: str) -> None:
    logs = []
    for side, model in (("a", model_a), ("b", model_b)):
        messages = []
        for turn in turns:
            messages += [ChatMessage(role="user", content=turn), ChatMessage(role="assistant", content="...")]
        logs.append(ConversationLog(id=f"{name}-{side}", model=model, messages=tuple(messages)))
    for log in logs:
        await bus.publish_event(log)
    await bus.publish_event(Vote(id=name, winner=winner, model_a=model_a, model_b=model_b, anonymous=True,
                                 conversation_a=logs[0].id, conversation_b=logs[1].id))


async def test_agreement_with_votes_from_the_stream(tmp_path):
    bench = load_bench("mt_bench")
    q81, q82 = (next(q for q in bench.questions if q.question_id == n) for n in (81, 82))
    with EmbeddedServer(port=free_port(), store_dir=tmp_path / "nats") as server:
        async with connect(BusConfig(url=server.url), "test-agreement", role="gateway") as bus:
            await cast(bus, "v1", [q81.turns[0]], "alpha", "beta", "model_a")  # agrees
            await cast(bus, "v2", [q81.turns[0]], "beta", "alpha", "model_b")  # sides swapped: agrees
            await cast(bus, "v3", [q82.turns[0]], "alpha", "beta", "tie")  # tie and tie
            await cast(bus, "v4", q81.turns[:2], "alpha", "beta", "model_a")  # turn 2: disagrees
            await cast(bus, "v5", ["not a bench question"], "alpha", "beta", "model_b")  # not counted
            votes = await arena_votes(bus, bench)
        assert sorted(v[:2] for v in votes) == [(81, 1), (81, 1), (81, 2), (82, 1)]

        judgments = tmp_path / "pair.jsonl"
        judgment_file(judgments)
        records = [json.loads(line) for line in judgments.read_text().splitlines()]
        table = {(r["turn"], r["ties"]): (r["agree"], r["total"])
                 for r in agreement_table(judge_verdicts(pair_rows(records)), human_verdicts(votes))}
        assert table == {(1, "with"): (3, 3), (1, "without"): (2, 2), (2, "with"): (0, 1), (2, "without"): (0, 1)}

        out = subprocess.run(
            [sys.executable, "-m", "chatfabric.deploy.cli", "judge", "agreement", str(judgments),
             "--nats-url", server.url], capture_output=True, text=True, timeout=120,
            env={**os.environ, "CHATFABRIC_LOG_LEVEL": "WARNING"})
    assert out.returncode == 0, out.stderr
    assert "4 arena votes on mt_bench questions" in out.stdout
    lines = [line.split() for line in out.stdout.splitlines()]
    assert ["1", "with", "3", "3", "1.00"] in lines and ["2", "without", "1", "0", "0.00"] in lines
