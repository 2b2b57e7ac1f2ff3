"""`chatfabric data split FILE --model-path DIR --max-length N --output OUT`: conversations
longer than N tokens cut at exchange boundaries into pieces that fit, each with the system
message."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from ...proto.messages import ChatMessage
from ..masks import Sample, render_with_mask
from .records import scan, valid_records, warn, with_turns, write_jsonl


def sample_length(prompts, messages: Sequence[ChatMessage]) -> int:
    """The tokens the trainer would train on for `messages`, uncut (its masked rendering; the
    whole rendering when the template cannot be masked)."""
    result = render_with_mask(prompts, messages, sys.maxsize)
    if isinstance(result, Sample):
        return len(result.input_ids)
    return len(prompts.chat_ids(messages))


def split_points(prompts, messages: Sequence[ChatMessage], max_length: int) -> tuple[list[list[int]], int]:
    """The conversation as pieces (lists of turn indices) that fit in `max_length` tokens each,
    cut between exchanges; each piece starts with the system message, if any. An exchange too
    long on its own is a piece of its own (counted in the second value; the trainer cuts it)."""
    head = [0] if messages and messages[0].role == "system" else []
    start = len(head)
    exchanges = [list(range(at, min(at + 2, len(messages)))) for at in range(start, len(messages), 2)]
    if len(exchanges) > 1 and messages[exchanges[-1][-1]].role == "user":  # a last question with no answer
        question = exchanges.pop()
        exchanges[-1] = exchanges[-1] + question
    pieces: list[list[int]] = []
    too_long = 0
    current: list[int] = []
    for exchange in exchanges:
        candidate = current + exchange
        if current and sample_length(prompts, [messages[i] for i in head + candidate]) > max_length:
            pieces.append(head + current)
            candidate = exchange
        current = candidate
        if len(current) == len(exchange) and sample_length(prompts, [messages[i] for i in head + current]) > max_length:
            too_long += 1
    if current:
        pieces.append(head + current)
    return pieces, too_long


def split(path: str | Path, output: str | Path, prompts, max_length: int,
          report_line: Callable[[str], None] = warn) -> dict:
    counts = Counter()
    rows = []
    for record in valid_records(scan(path), report_line):
        counts["read"] += 1
        messages = record.conversation.messages
        if sample_length(prompts, messages) <= max_length:
            rows.append(with_turns(record, range(len(messages))))
            continue
        pieces, too_long = split_points(prompts, messages, max_length)
        counts["split"] += len(pieces) > 1
        counts["too long"] += too_long
        if too_long:
            report_line(f"{path}:{record.line} (record {record.id}): {too_long} exchange(s) longer than "
                        f"{max_length} tokens on their own, left whole (the trainer cuts them)")
        rows += [with_turns(record, piece, f"#{n}" if len(pieces) > 1 else "") for n, piece in enumerate(pieces)]
    counts["written"] = write_jsonl(rows, output)
    return dict(counts)
