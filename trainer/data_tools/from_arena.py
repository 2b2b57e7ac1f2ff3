"""`chatfabric data from-arena --output OUT [--pairs]`: conversations (or DPO preference pairs)
from `ARENA`."""

from __future__ import annotations

from pathlib import Path

from ..data import DataError, to_conversation
from .records import write_jsonl


async def arena_conversations(bus, *, until: float | None = None, model: str | None = None,
                              winners: bool = False, anonymous_only: bool = True) -> tuple[list[dict], int]:
    """The conversations logged in ARENA (the last log of each), as OpenAI `messages` records
    the trainer reads; with `winners`, only the winning sides of votes. The second value counts
    the logs left out because the trainer could not train on them (roles out of order, no answer)."""
    from ...proto.events import ConversationLog, Vote
    from ...proto.replay import replay

    logs = {item.message.id: item.message async for item in replay(bus, ConversationLog, until=until)}
    if winners:
        won = set()
        async for item in replay(bus, Vote, until=until):
            vote = item.message
            if vote.winner in ("model_a", "model_b") and (vote.anonymous or not anonymous_only):
                won.add(vote.conversation_a if vote.winner == "model_a" else vote.conversation_b)
        logs = {k: v for k, v in logs.items() if k in won}
    rows, unusable = [], 0
    for log in logs.values():
        if model is not None and log.model != model:
            continue
        row = {"id": log.id, "model": log.model, "messages": [m.model_dump() for m in log.messages]}
        try:
            to_conversation(row, "ARENA", None, 0)
        except DataError:
            unusable += 1
            continue
        rows.append(row)
    return rows, unusable


async def from_arena(args) -> None:
    from ..cli import _bus

    async with _bus(args) as bus:
        if args.pairs:
            from ..pairs import read_arena_pairs, write_pairs

            pairs = await read_arena_pairs(bus, until=args.as_of, anonymous_only=not args.include_named)
            write_pairs(pairs, Path(args.output))
            print(f"{len(pairs)} preference pairs from ARENA written to {args.output}")
            return
        rows, unusable = await arena_conversations(bus, until=args.as_of, model=args.model, winners=args.winners,
                                                   anonymous_only=not args.include_named)
    write_jsonl(rows, args.output)
    print(f"{len(rows)} conversations from ARENA written to {args.output}"
          + (f" ({unusable} left out: not trainable)" if unusable else ""))
