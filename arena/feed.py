"""The leaderboard's side of the bus: battles from a replay of ARENA (`read_arena`), a follower
that keeps them current through the durable consumer `leaderboard` and publishes snapshots
(`follow`), and the latest snapshot for readers such as the arena's Leaderboard tab
(`latest_snapshot`). The ratings themselves are computed by `results.compute_results`, in a
thread: nothing here blocks the event loop for longer than one message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ..proto import contract, subjects
from ..proto.bus import Bus
from ..proto.bus_errors import BusUnavailable
from ..proto.pull import Delivery
from ..proto.events import ConversationLog, Vote
from ..proto.replay import replay
from ..proto.roles import LEADERBOARD_SNAPSHOT
from . import ratings
from .results import RatingSystem, Results, compute_results, rated_battles
from .votes import OnlineElo, StyleIndex, VoteColumns

log = logging.getLogger(__name__)

SNAPSHOT = LEADERBOARD_SNAPSHOT
FETCH_BATCH = 500
FETCH_WAIT = 0.5  # seconds a pull waits for new messages before the loop looks at the clock again


def assistant_text(conversation: ConversationLog) -> str:
    return "\n".join(message.content for message in conversation.messages if message.role == "assistant")


@dataclass
class Tally:
    """Every vote counted so far, the logged conversations' style counts, and how far the
    stream was read: everything up to sequence `tail` is in (where the replays stopped, then
    the last message a follower took); `last_seq` is the last vote counted."""

    columns: VoteColumns = field(default_factory=VoteColumns)
    style: StyleIndex = field(default_factory=StyleIndex)
    tail: int = 0
    last_seq: int | None = None

    def count(self, seq: int, vote: Vote, keep_conversations: bool) -> None:
        conversations = (vote.conversation_a, vote.conversation_b) if keep_conversations else None
        self.columns.add(vote.model_a, vote.model_b, vote.winner, vote.at, vote.anonymous, conversations)
        self.last_seq = seq


async def read_arena(bus: Bus, *, until: float | None = None, anonymous_only: bool = True,
                     keep_conversations: bool = False) -> Tally:
    """The votes in ARENA (anonymous ones only, by default) stored up to `until` (unix time;
    default now), with the style counts of the conversations logged up to then. Conversation
    keys are kept per vote when some conversation was logged, or always with
    `keep_conversations` (a follower, whose conversations may come later)."""
    tally = Tally()
    tally.tail = await bus.last_seq(subjects.ARENA_STREAM)
    async for item in _upto(replay(bus, ConversationLog, until=until), tally.tail):
        tally.style.add(item.message.id, assistant_text(item.message))
    keep = keep_conversations or len(tally.style) > 0
    votes = subjects.vote_subject(True) if anonymous_only else Vote.SUBJECTS
    async for item in _upto(replay(bus, Vote, votes, until=until), tally.tail):
        tally.count(item.seq, item.message, keep)
    return tally


async def _upto(read, tail: int):
    """The items of a replay up to sequence `tail` (the replay's own tail may be later)."""
    async with contextlib.aclosing(aiter(read)) as items:
        async for item in items:
            if item.seq > tail:
                return
            yield item


# -- the follower ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowOptions:
    rating_system: RatingSystem = "bt"
    rounds: int = 100
    seed: int = 0
    anonymous_only: bool = True
    exclude_ties: bool = False
    snapshot_interval: float = 10.0  # seconds between two snapshots at least
    output: Path | None = None  # also write each snapshot here


def _counts(vote: Vote, options: FollowOptions) -> bool:
    """Whether the leaderboard rates this vote."""
    return (vote.anonymous or not options.anonymous_only) and not (options.exclude_ties and vote.winner.startswith("tie"))


async def follow(bus: Bus, options: FollowOptions, stop: asyncio.Event) -> None:
    """Replay ARENA, then take new votes and conversations from the durable consumer
    `leaderboard` as they are stored: online Elo moves with each vote; Bradley-Terry, the
    bootstrap and style control are recomputed in a thread and published as the snapshot
    `leaderboard/latest.json` at most every `snapshot_interval` seconds, until `stop`.
    One follower per fabric: followers sharing the consumer would split the votes."""
    tally = await read_arena(bus, anonymous_only=options.anonymous_only, keep_conversations=True)
    rated = rated_battles(tally.columns.battles(), options.anonymous_only, options.exclude_ties)
    elo = OnlineElo.from_table(rated, ratings.elo_ratings(rated))
    log.info("leaderboard: %d votes replayed up to sequence %d; following ARENA", len(tally.columns), tally.tail)
    pull = await bus.pull(contract.leaderboard_consumer(bus.config, start_seq=tally.tail + 1), "leaderboard")
    loop = asyncio.get_running_loop()
    computing: asyncio.Task | None = None
    changed, last_snapshot = True, -float("inf")
    try:
        async for batch in pull.batches(stop, lambda: FETCH_BATCH, FETCH_WAIT):
            for delivery in batch:
                changed |= _take(delivery, tally, elo, options)
                with contextlib.suppress(Exception):
                    await delivery.ack()  # a lost ack means a redelivery, which `_take` skips
            if computing is not None and computing.done():
                changed |= not _published(computing)
                computing = None
            if changed and computing is None and loop.time() - last_snapshot >= options.snapshot_interval:
                changed, last_snapshot = False, loop.time()
                computing = asyncio.create_task(_snapshot(bus, tally, dict(elo.ratings), options))
    finally:
        if computing is not None:
            computing.cancel()
            await asyncio.gather(computing, return_exceptions=True)
        await pull.unsubscribe()


def _published(computing: asyncio.Task) -> bool:
    """Whether a snapshot went out. One the server did not take (it is away) is retried at the
    next interval; any other failure (a bug in the computation) stops the follower, loudly."""
    error = computing.exception()
    if isinstance(error, (BusUnavailable, asyncio.TimeoutError, ConnectionError)):
        log.warning("leaderboard: the snapshot was not stored (%s); retrying", error or type(error).__name__)
        return False
    if error is not None:
        raise error
    return True


def _take(msg: Delivery, tally: Tally, elo: OnlineElo, options: FollowOptions) -> bool:
    """Count one message of the consumer; True when the leaderboard changed."""
    seq = msg.seq
    if seq <= tally.tail:
        return False  # counted already: by the replay, or a redelivery after a lost ack
    tally.tail = seq
    try:
        kind = subjects.arena_kind(msg.subject)
        if kind == "conv":
            conversation = ConversationLog.model_validate_json(msg.data)
            tally.style.add(conversation.id, assistant_text(conversation))
            return True
        if kind != "vote":
            return False
        vote = Vote.model_validate_json(msg.data)
    except ValidationError as err:
        log.warning("leaderboard: skipped sequence %d on %s, not valid: %s", seq, msg.subject, err)
        return False
    if vote.anonymous or not options.anonymous_only:
        tally.count(seq, vote, keep_conversations=True)
    if _counts(vote, options):
        elo.update(vote.model_a, vote.model_b, vote.winner)
    return True


async def _snapshot(bus: Bus, tally: Tally, online_elo: dict[str, float], options: FollowOptions) -> None:
    """Rate a copy of the tally in a thread, then replace the published snapshot."""
    columns, style, last_seq = tally.columns.copy(), tally.style.copy(), tally.last_seq  # memory copies
    battles = await asyncio.to_thread(columns.battles, style)
    results = await asyncio.to_thread(
        compute_results, battles, rating_system=options.rating_system, rounds=options.rounds, seed=options.seed,
        anonymous_only=options.anonymous_only, exclude_ties=options.exclude_ties, last_seq=last_seq,
        source=subjects.ARENA_STREAM, online_elo=online_elo,
    )
    data = results.model_dump_json().encode()
    await bus.put_artifact(subjects.LEADERBOARD_BUCKET, SNAPSHOT, data, description=f"leaderboard of {results.battles} battles")
    if options.output is not None:
        await asyncio.to_thread(options.output.write_bytes, data)
    log.info("leaderboard: snapshot of %d battles (up to sequence %s) published", results.battles, last_seq)


async def latest_snapshot(bus: Bus) -> Results | None:
    """The follower's latest published leaderboard, or None when none was published yet."""
    try:
        data = await bus.read_artifact(subjects.LEADERBOARD_BUCKET, SNAPSHOT)
    except contract.ContractMissing:
        return None
    return None if data is None else Results.model_validate_json(data)
