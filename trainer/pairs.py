"""Preference pairs from the arena: for each vote, the winning side's last answer is chosen and
the losing side's rejected, after the same conversation. Ties and both-bad votes teach no
preference and are left out; so are votes whose two conversations differ before their last
answers, or whose logs are missing. Anonymous battles only, unless asked; duplicates once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..proto.events import ConversationLog, Vote
from ..proto.files import atomic_writer
from .dpo import Pair


def arena_pairs(votes: Iterable[Vote], conversations: dict[str, ConversationLog],
                anonymous_only: bool = True) -> list[Pair]:
    pairs, seen = [], set()
    for vote in votes:
        if vote.winner not in ("model_a", "model_b") or (anonymous_only and not vote.anonymous):
            continue
        a, b = conversations.get(vote.conversation_a), conversations.get(vote.conversation_b)
        if a is None or b is None:
            continue
        winner, loser = (a, b) if vote.winner == "model_a" else (b, a)
        pair = _pair(winner.messages, loser.messages)
        if pair is not None and pair.key() not in seen:
            seen.add(pair.key())
            pairs.append(pair)
    return pairs


def _pair(won, lost) -> Pair | None:
    if won[-1].role != "assistant" or lost[-1].role != "assistant":
        return None
    if [m for m in won[:-1] if m.role != "assistant"] != [m for m in lost[:-1] if m.role != "assistant"]:
        return None
    if won[-1].content == lost[-1].content:
        return None
    return Pair(tuple(won[:-1]), won[-1].content, lost[-1].content)


async def read_arena_pairs(bus, *, until: float | None = None, anonymous_only: bool = True) -> list[Pair]:
    """The pairs in ARENA as of `until` (unix time; None: now)."""
    from ..proto.replay import replay

    conversations = {item.message.id: item.message async for item in replay(bus, ConversationLog, until=until)}
    votes = [item.message async for item in replay(bus, Vote, until=until)]
    return arena_pairs(votes, conversations, anonymous_only)


def write_pairs(pairs: list[Pair], path: Path) -> Path:
    with atomic_writer(path) as f:
        for p in pairs:
            record = {"prompt": [m.model_dump() for m in p.prompt], "chosen": p.chosen, "rejected": p.rejected}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
