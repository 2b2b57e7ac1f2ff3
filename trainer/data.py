"""Training data files: conversations in ShareGPT form (`conversations: [{from, value}]`) or
OpenAI form (`messages: [{role, content}]`), as a JSON array or JSON Lines, read into
`Conversation`s. Every problem is a `DataError` naming the file, the line and the record id,
so a user can fix the file instead of guessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from ..proto.files import RecordError, json_records
from ..proto.messages import ChatMessage

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


class DataError(ValueError):
    """A data file that cannot be trained on, and where."""

    def __init__(self, path: str | Path, line: int | None, record: str | None, reason: str):
        where = f"{path}" + (f":{line}" if line is not None else "")
        super().__init__(f"{where}{f' (record {record})' if record else ''}: {reason}")
        self.path, self.line, self.record, self.reason = str(path), line, record, reason


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[ChatMessage, ...]
    line: int | None = None


def read_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line, record) for each record of a JSON array or JSON Lines file."""
    try:
        yield from json_records(path)
    except RecordError as err:
        raise DataError(Path(path), err.line, None, err.reason) from None


def to_conversation(record: object, path: str | Path, line: int | None, index: int) -> Conversation:
    """One record as a conversation whose roles are in order: an optional system message, then
    user and assistant turns alternating, starting with the user and holding an answer."""
    if not isinstance(record, dict):
        raise DataError(path, line, None, f"a record must be a JSON object, got {type(record).__name__}")
    record_id = str(record.get("id", index))
    if "conversations" in record:
        turns = _sharegpt_turns(record["conversations"], path, line, record_id)
    elif "messages" in record:
        turns = _openai_turns(record["messages"], path, line, record_id)
    else:
        raise DataError(path, line, record_id, "no 'conversations' (ShareGPT) or 'messages' (OpenAI) field")
    try:
        messages = tuple(ChatMessage(role=role, content=content) for role, content in turns)
    except ValidationError as err:
        raise DataError(path, line, record_id, f"a message does not validate: {err.errors()[0]['msg']}") from None
    check_role_order(messages, path, line, record_id)
    return Conversation(record_id, messages, line)


def _sharegpt_turns(turns, path, line, record_id) -> list[tuple[str, str]]:
    out = []
    for n, turn in enumerate(_turn_list(turns, "conversations", path, line, record_id)):
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or role not in SHAREGPT_ROLES:
            raise DataError(path, line, record_id, f"turn {n}: 'from' must be one of {sorted(SHAREGPT_ROLES)}, "
                            f"got {role!r}")
        if not isinstance(value, str):
            raise DataError(path, line, record_id, f"turn {n}: 'value' must be a string")
        out.append((SHAREGPT_ROLES[role], value))
    return out


def _openai_turns(turns, path, line, record_id) -> list[tuple[str, str]]:
    out = []
    for n, turn in enumerate(_turn_list(turns, "messages", path, line, record_id)):
        role, content = turn.get("role"), turn.get("content")
        if role not in ("system", "user", "assistant"):
            raise DataError(path, line, record_id, f"message {n}: 'role' must be system, user or assistant, "
                            f"got {role!r}")
        if not isinstance(content, str):
            raise DataError(path, line, record_id, f"message {n}: 'content' must be a string")
        out.append((role, content))
    return out


def _turn_list(turns, field: str, path, line, record_id) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(path, line, record_id, f"'{field}' must be a non-empty list")
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(path, line, record_id, f"{field}[{n}] must be an object")
    return turns


def check_role_order(messages, path, line, record_id) -> None:
    body = list(messages)
    if body and body[0].role == "system":
        body = body[1:]
    for n, message in enumerate(body):
        expected = "user" if n % 2 == 0 else "assistant"
        if message.role != expected:
            raise DataError(path, line, record_id, f"turn {n + len(messages) - len(body)} is {message.role}, "
                            f"expected {expected} (after an optional system message, user and assistant "
                            "turns alternate, starting with the user)")
    if not any(m.role == "assistant" for m in body):
        raise DataError(path, line, record_id, "no assistant turn: nothing to learn")


def load_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation in `path`; the first problem found is raised as a `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    out = [to_conversation(record, path, line, index) for index, (line, record) in enumerate(read_records(path))]
    if not out:
        raise DataError(path, None, None, "no records")
    return out
