"""FastChat clean-battle files in and out of ARENA: `import_file` publishes each battle as a
`Vote` (and its two conversations as `ConversationLog`s when the record has them), and
`export_records` writes the stream back in the same format.

Importing is idempotent. Each battle gets an id derived from the record alone: the `vote_id`
an export wrote; else `fc-<question_id>` for the first battle of the file with that FastChat
question id; else `imp-` and a hash of the record's canonical JSON and of how many identical
records came before it in the file (so genuine repeats stay distinct, and a file that grew
keeps its ids). Before publishing, the ids already in ARENA are read by a replay, so a second
import adds nothing however long after the first; within the stream's duplicate window
JetStream's own de-duplication on the id covers concurrent imports too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from ..proto.bus import Bus
from ..proto.events import ConversationLog, Vote
from ..proto.messages import ChatMessage
from ..proto.replay import replay
from ..proto.subjects import vote_subject
from .battles import BattleFormatError, check_battle, describe, read_records

QUESTION_PREFIX = "fc-"
HASH_PREFIX = "imp-"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,120}$")  # leaves room for a prefix and the conversations' -a/-b


@dataclass
class VoteIds:
    """Derives each battle's vote id, in file order (see the module docstring)."""

    questions: set[str] = field(default_factory=set)
    repeats: dict[int, int] = field(default_factory=dict)

    def __call__(self, record: dict) -> str:
        exported = record.get("vote_id")
        if isinstance(exported, str) and _ID.match(exported):
            return exported
        question = record.get("question_id")
        if isinstance(question, str) and _ID.match(question) and question not in self.questions:
            self.questions.add(question)
            return QUESTION_PREFIX + question
        canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).digest()
        key = int.from_bytes(digest[:8], "little")
        before = self.repeats.get(key, 0)
        self.repeats[key] = before + 1
        return HASH_PREFIX + hashlib.sha256(digest + before.to_bytes(8, "little")).hexdigest()[:40]


def battle_events(record: dict, vote_id: str) -> tuple[Vote, tuple[ConversationLog, ...]]:
    """The vote of one clean-battle record and the conversations it carries."""
    check_battle(record)
    judge = record.get("judge")
    client = judge if isinstance(judge, str) and len(judge) <= 128 else ""
    conversations = (f"{vote_id}-a", f"{vote_id}-b")
    vote = Vote(id=vote_id, at=record["tstamp"], winner=record["winner"], model_a=record["model_a"],
                model_b=record["model_b"], anonymous=record["anony"], conversation_a=conversations[0],
                conversation_b=conversations[1], client=client)
    if "conversation_a" not in record or "conversation_b" not in record:
        return vote, ()
    logs = tuple(
        ConversationLog(id=conversation, at=record["tstamp"], model=record[f"model_{side}"], client=client,
                        messages=tuple(ChatMessage(role=turn["role"], content=turn["content"])
                                       for turn in record[f"conversation_{side}"]))
        for side, conversation in zip("ab", conversations)
    )
    return vote, logs


def file_events(path: Path) -> Iterator[tuple[Vote, tuple[ConversationLog, ...]]]:
    """Every battle of a clean-battle file as events; `BattleFormatError` names the line of the
    first record that is not a valid battle."""
    ids = VoteIds()
    for line, record in read_records(path):
        try:
            if not isinstance(record, dict):
                raise TypeError("a battle must be a JSON object")
            yield battle_events(record, ids(record))
        except (KeyError, TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            raise BattleFormatError(f"{path}:{line}: {describe(error)}") from None


@dataclass
class ImportReport:
    battles: int = 0
    stored: int = 0  # votes new to the stream
    present: int = 0  # votes the stream already held


async def stored_vote_ids(bus: Bus) -> set[str]:
    """The ids of every vote in ARENA (named and anonymous)."""
    return {item.message.id async for item in replay(bus, Vote)}


async def import_file(bus: Bus, path: Path) -> ImportReport:
    """Publish the battles of `path` that ARENA does not hold yet, in file order, each vote
    after its conversations; the whole file is checked before anything is published."""
    for _ in file_events(path):
        pass
    present, report = await stored_vote_ids(bus), ImportReport()
    for vote, logs in file_events(path):
        report.battles += 1
        if vote.id in present:
            report.present += 1
            continue
        for log in logs:
            await bus.publish_event(log)
        ack = await bus.publish_event(vote)
        if ack.duplicate:
            report.present += 1
        else:
            report.stored += 1
    return report


# -- export ---------------------------------------------------------------------------------------


def battle_record(vote: Vote, conversations: dict[str, list[dict]]) -> dict:
    """The clean-battle record of a vote; `vote_id` lets an import of it recognise the vote."""
    record = {"model_a": vote.model_a, "model_b": vote.model_b, "winner": vote.winner, "tstamp": vote.at,
              "anony": vote.anonymous}
    if vote.id.startswith(QUESTION_PREFIX):
        record["question_id"] = vote.id[len(QUESTION_PREFIX):]
    if vote.client:
        record["judge"] = vote.client
    if vote.conversation_a in conversations and vote.conversation_b in conversations:
        record["conversation_a"] = conversations[vote.conversation_a]
        record["conversation_b"] = conversations[vote.conversation_b]
    record["vote_id"] = vote.id
    return record


async def export_records(bus: Bus, out: IO[str], *, anonymous_only: bool = True,
                         with_conversations: bool = True) -> int:
    """Write the votes of ARENA (anonymous ones by default) as JSON Lines, in stream order, with
    their conversations when both were logged (those are held in memory while writing)."""
    conversations: dict[str, list[dict]] = {}
    if with_conversations:
        async for item in replay(bus, ConversationLog):
            conversations[item.message.id] = [turn.model_dump() for turn in item.message.messages]
    subject = vote_subject(True) if anonymous_only else Vote.SUBJECTS
    written = 0
    async with contextlib.aclosing(aiter(replay(bus, Vote, subject))) as votes:
        async for item in votes:
            out.write(json.dumps(battle_record(item.message, conversations), ensure_ascii=False) + "\n")
            written += 1
    return written
