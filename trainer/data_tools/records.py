"""Reading a data file as the trainer does, but on past errors: every record with its
conversation or its error (`scan`), and writing records back in their own format."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ...proto.files import atomic_writer
from ..data import DataError, read_records, to_conversation

DEFAULT_MAX_LENGTH = 2048  # the trainer's default --max-length


@dataclass(frozen=True)
class Record:
    line: int | None
    index: int  # position among the file's records (the id of a record without one)
    raw: object  # the JSON value as read
    conversation: object | None = None  # a `data.Conversation` when the record is valid
    error: DataError | None = None
    whole_file: bool = False  # the error is the file's (missing, unreadable, not JSON, empty), not a record's

    @property
    def id(self) -> str:
        return self.conversation.id if self.conversation is not None else (self.error.record or str(self.index))


def scan(path: str | Path) -> list[Record]:
    """Every record of a data file, each as a conversation or as the error that keeps the trainer
    from reading it. Unlike `data.load_conversations`, it goes on after an error: a JSON Lines
    file's bad lines are errors of their own. (A JSON array that does not parse is one error.)"""
    path = Path(path)
    if not path.is_file():
        return [Record(None, 0, None, error=DataError(path, None, None, "no such file"), whole_file=True)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return [Record(None, 0, None, error=DataError(path, None, None,
                                                      f"not UTF-8 text ({err.reason} at byte {err.start})"),
                       whole_file=True)]
    raws: list[tuple[int, object]] = []
    bad: dict[int, DataError] = {}
    if text.lstrip().startswith("["):
        try:
            raws = list(read_records(path))
        except DataError as err:
            return [Record(err.line, 0, None, error=err, whole_file=True)]
    else:
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                raws.append((number, json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as err:
                reason = (f"not valid JSON: {err.msg} (column {err.colno})" if isinstance(err, json.JSONDecodeError)
                          else "not valid JSON: nested too deeply")
                bad[len(raws)] = DataError(path, number, None, reason)
                raws.append((number, None))
    records = []
    for index, (line, raw) in enumerate(raws):
        if index in bad:
            records.append(Record(line, index, None, error=bad[index]))
            continue
        try:
            records.append(Record(line, index, raw, conversation=to_conversation(raw, path, line, index)))
        except DataError as err:
            records.append(Record(line, index, raw, error=err))
    if not records:
        records.append(Record(None, 0, None, error=DataError(path, None, None, "no records"), whole_file=True))
    return records


def with_turns(record: Record, keep: Sequence[int], suffix: str = "") -> dict:
    """The record as read, holding only the turns at `keep` (indices into its turn list, which
    are those of its conversation's messages), in its own format; `suffix` is added to its id."""
    raw = dict(record.raw)
    field = "conversations" if "conversations" in raw else "messages"
    raw[field] = [raw[field][i] for i in keep]
    if suffix or "id" not in raw:
        raw = {"id": f"{record.id}{suffix}", **{k: v for k, v in raw.items() if k != "id"}}
    return raw


def valid_records(records: Iterable[Record], report: Callable[[str], None]) -> list[Record]:
    out = []
    for record in records:
        if record.error is not None:
            report(f"skipped: {record.error}")
        else:
            out.append(record)
    return out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    n = 0
    with atomic_writer(Path(path)) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def warn(text: str) -> None:
    print(text, file=sys.stderr)
