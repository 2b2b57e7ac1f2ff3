"""`chatfabric data clean FILE --output OUT`: drops empty turns (the exchange holding one, and
what follows it), an exchange repeating the one before it, conversations with a blocked word,
conversations mostly in other scripts than `--keep-script` (a script filter, not a language
detector), and duplicate conversations."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ...proto.messages import ChatMessage
from .records import scan, warn, with_turns, write_jsonl


SCRIPT_NAMES = {"cjk": ("CJK",), "japanese": ("CJK", "HIRAGANA", "KATAKANA"), "korean": ("HANGUL",)}


def script_of(char: str) -> str:
    """The Unicode script a letter belongs to, from its name (`LATIN`, `CYRILLIC`, `CJK`, ...)."""
    try:
        return unicodedata.name(char).split(" ", 1)[0]
    except ValueError:
        return "UNKNOWN"


def script_share(text: str, scripts: set[str]) -> float:
    """The share of `text`'s letters written in `scripts` (1.0 for a text without letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    return sum(script_of(c) in scripts for c in letters) / len(letters)


def parse_scripts(text: str) -> set[str]:
    out = set()
    for name in (n.strip().lower() for n in text.split(",") if n.strip()):
        out.update(SCRIPT_NAMES.get(name, (name.upper(),)))
    return out


def read_blocked_words(path: str | Path) -> list[str]:
    """One word or phrase a line; blank lines and lines starting with # are ignored."""
    return [w.strip() for w in Path(path).read_text(encoding="utf-8").splitlines()
            if w.strip() and not w.lstrip().startswith("#")]


def blocked_pattern(words: Sequence[str]) -> re.Pattern | None:
    """Whole words (or phrases), case-insensitive."""
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


@dataclass
class CleanReport:
    read: int = 0
    kept: int = 0
    dropped: Counter = None  # reason -> conversations
    turns: Counter = None  # reason -> turns removed from kept conversations

    def __post_init__(self):
        self.dropped, self.turns = Counter(), Counter()

    def summary(self) -> str:
        parts = [f"kept {self.kept} of {self.read} conversations"]
        if self.dropped:
            parts.append("dropped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())))
        if self.turns:
            parts.append("turns removed: " + ", ".join(f"{n} {why}" for why, n in sorted(self.turns.items())))
        return "; ".join(parts)


def clean_turns(messages: Sequence[ChatMessage]) -> tuple[list[int], Counter]:
    """The indices of the turns to keep, and how many were removed and why. An empty system
    message goes; the conversation ends before the first exchange holding an empty turn (what
    follows answers or asks about a missing text); an exchange (user turn and its answer)
    identical to the one before it goes."""
    removed = Counter()
    keep = []
    start = 0
    if messages and messages[0].role == "system":
        start = 1
        if messages[0].content.strip():
            keep.append(0)
        else:
            removed["empty"] += 1
    previous = None
    for at in range(start, len(messages), 2):
        exchange = list(range(at, min(at + 2, len(messages))))
        if any(not messages[i].content.strip() for i in exchange):
            removed["empty"] += sum(not messages[i].content.strip() for i in range(at, len(messages)))
            removed["cut with an empty turn"] += sum(bool(messages[i].content.strip()) for i in range(at, len(messages)))
            break
        contents = tuple(messages[i].content.strip() for i in exchange)
        if contents == previous:
            removed["duplicate"] += len(exchange)
            continue
        previous = contents
        keep.extend(exchange)
    return keep, removed


def clean(path: str | Path, output: str | Path, blocked_words: Sequence[str] = (), keep_scripts: set[str] | None = None,
          min_script_share: float = 0.5, dedupe: bool = True, report_line: Callable[[str], None] = warn) -> CleanReport:
    report = CleanReport()
    pattern = blocked_pattern(blocked_words)
    seen: set = set()
    rows = []
    for record in scan(path):
        report.read += 1
        if record.error is not None:
            report.dropped["invalid"] += 1
            report_line(f"dropped: {record.error}")
            continue
        messages = record.conversation.messages
        keep, removed = clean_turns(messages)
        kept = [messages[i] for i in keep]
        if not any(m.role == "assistant" for m in kept):
            report.dropped["empty"] += 1
            continue
        if pattern is not None and (hit := next((pattern.search(m.content) for m in kept
                                                 if pattern.search(m.content)), None)):
            report.dropped["blocked word"] += 1
            report_line(f"dropped: {path}:{record.line} (record {record.id}): "
                        f"blocked word {hit.group(0)!r}")
            continue
        if keep_scripts and script_share(" ".join(m.content for m in kept), keep_scripts) < min_script_share:
            report.dropped["other script"] += 1
            continue
        key = tuple((m.role, " ".join(m.content.split())) for m in kept)
        if dedupe and key in seen:
            report.dropped["duplicate"] += 1
            continue
        seen.add(key)
        report.turns.update(removed)
        rows.append(with_turns(record, keep))
    report.kept = write_jsonl(rows, output)
    return report
