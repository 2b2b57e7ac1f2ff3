"""`chatfabric data check|clean|split|stats|from-arena|masks`: tools for training data files,
read with the trainer's own readers (`data.py`) and rendered with its own masks (`masks.py`), so
what they report is what `chatfabric train` would see.

- `check FILE...`: every format and role-order error, each with its line and record id; exit
  status 1 when there is any.
- `clean FILE --output OUT`: drops empty turns (the exchange holding one, and what follows it),
  an exchange repeating the one before it, conversations with a blocked word, conversations
  mostly in other scripts than `--keep-script` (a script filter, not a language detector), and
  duplicate conversations.
- `split FILE --model-path DIR --max-length N --output OUT`: conversations longer than N tokens
  cut at exchange boundaries into pieces that fit, each with the system message.
- `stats FILE...`: conversations, turns and tokens per role, sample lengths as rendered for
  training, a length histogram.
- `from-arena --output OUT [--pairs]`: conversations (or DPO preference pairs) from `ARENA`.
- `masks --model-path DIR --data FILE --output MASKS.jsonl`: each sample's `input_ids`, `labels`
  (-100 where masked, aligned with the inputs) and conversation, and one sample in the terminal
  with its trained tokens highlighted.

Every command but `from-arena` works on files alone, without a NATS server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..proto.files import atomic_writer
from ..proto.messages import ChatMessage
from .data import DataError, read_records, to_conversation
from .masks import IGNORE, MaskReport, Sample, render_with_mask

DEFAULT_MAX_LENGTH = 2048  # the trainer's default --max-length
HISTOGRAM_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192)


# --- reading: every record, with its conversation or its error -----------------------------------------------


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


def _valid(records: Iterable[Record], report: Callable[[str], None]) -> list[Record]:
    out = []
    for record in records:
        if record.error is not None:
            report(f"skipped: {record.error}")
        else:
            out.append(record)
    return out


def _write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    n = 0
    with atomic_writer(Path(path)) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


# --- check ------------------------------------------------------------------------------------------------------


def check(paths: Sequence[str | Path], out=None) -> int:
    """Print every error as `FILE:LINE (record ID): reason`; the number of errors."""
    out = out or sys.stdout
    errors = total = 0
    for path in paths:
        records = scan(path)
        for record in records:
            if record.error is not None:
                errors += 1
                print(str(record.error), file=out)
        total += sum(not r.whole_file for r in records)
    print(f"{total} records, {errors} with errors" if errors else f"{total} records, no errors", file=out)
    return errors


# --- clean ------------------------------------------------------------------------------------------------------


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
          min_script_share: float = 0.5, dedupe: bool = True, report_line: Callable[[str], None] = _warn) -> CleanReport:
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
    report.kept = _write_jsonl(rows, output)
    return report


# --- split ------------------------------------------------------------------------------------------------------


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
          report_line: Callable[[str], None] = _warn) -> dict:
    counts = Counter()
    rows = []
    for record in _valid(scan(path), report_line):
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
    counts["written"] = _write_jsonl(rows, output)
    return dict(counts)


# --- stats ------------------------------------------------------------------------------------------------------


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def compute_stats(paths: Sequence[str | Path], prompts, max_length: int = DEFAULT_MAX_LENGTH,
                  report_line: Callable[[str], None] = _warn) -> dict:
    """Conversations, turns per role, content tokens per role, and the samples as the trainer
    renders them: tokens, trained tokens, a histogram of lengths, how many would be cut."""
    turns, tokens, lengths, trained, masks = Counter(), Counter(), [], 0, MaskReport()
    conversations = invalid = 0
    for path in paths:
        for record in scan(path):
            if record.error is not None:
                invalid += 1
                report_line(f"skipped: {record.error}")
                continue
            conversations += 1
            messages = record.conversation.messages
            for m in messages:
                turns[m.role] += 1
                tokens[m.role] += _tokens(prompts.tokenizer, m.content)
            result = render_with_mask(prompts, messages, sys.maxsize, record.id)
            masks.add(result)
            if isinstance(result, Sample):
                lengths.append(len(result.input_ids))
                trained += result.trained
    edges = (0, *HISTOGRAM_EDGES)
    histogram = [{"from": lo, "to": hi, "samples": sum(lo <= n < hi for n in lengths)}
                 for lo, hi in zip(edges, edges[1:])]
    histogram.append({"from": edges[-1], "to": None, "samples": sum(n >= edges[-1] for n in lengths)})
    return {
        "conversations": conversations, "invalid": invalid,
        "turns": {"total": sum(turns.values()), **{r: turns[r] for r in ("system", "user", "assistant")}},
        "turns_per_conversation": round(sum(turns.values()) / conversations, 2) if conversations else 0.0,
        "tokens": {"total": sum(tokens.values()), **{r: tokens[r] for r in ("system", "user", "assistant")}},
        "samples": {"count": len(lengths), "skipped": sum(masks.skipped.values()), "tokens": sum(lengths),
                    "trained_tokens": trained, "min": min(lengths, default=0), "max": max(lengths, default=0),
                    "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
                    "over_max_length": sum(n > max_length for n in lengths), "max_length": max_length},
        "histogram": histogram,
    }


def format_stats(stats: dict) -> str:
    t, k, s = stats["turns"], stats["tokens"], stats["samples"]
    lines = [f"conversations   {stats['conversations']}" + (f" ({stats['invalid']} invalid records skipped)"
                                                             if stats["invalid"] else ""),
             f"turns           {t['total']} (system {t['system']}, user {t['user']}, assistant {t['assistant']}; "
             f"{stats['turns_per_conversation']} per conversation)",
             f"content tokens  {k['total']} (system {k['system']}, user {k['user']}, assistant {k['assistant']})",
             f"samples         {s['count']} ({s['skipped']} skipped), {s['tokens']} tokens, "
             f"{s['trained_tokens']} trained; length min {s['min']}, mean {s['mean']}, max {s['max']}; "
             f"{s['over_max_length']} longer than {s['max_length']} (cut by the trainer)",
             "sample length (tokens, as rendered for training)"]
    peak = max((b["samples"] for b in stats["histogram"]), default=0) or 1
    for b in stats["histogram"]:
        label = f"{b['from']:>5}-{b['to'] - 1:<5}" if b["to"] else f"{b['from']:>5}+     "
        lines.append(f"  {label} {b['samples']:>6} {'#' * round(40 * b['samples'] / peak)}".rstrip())
    return "\n".join(lines)


# --- masks ------------------------------------------------------------------------------------------------------


def build_masks(path: str | Path, prompts, max_length: int) -> tuple[list[tuple[Sample, object]], MaskReport]:
    """Each trainable conversation of `path` with its sample, made by the trainer's masking
    function with the trainer's settings; the report counts what was skipped and why."""
    from .data import load_conversations

    report, out = MaskReport(), []
    for conversation in load_conversations(path):
        result = render_with_mask(prompts, conversation.messages, max_length, conversation.id)
        report.add(result)
        if isinstance(result, Sample):
            out.append((result, conversation))
    return out, report


TRAINED_ON, TRAINED_OFF = "\x1b[1;30;42m", "\x1b[0m"


def render_sample(tokenizer, sample: Sample, color: bool) -> str:
    """The sample's text with the trained runs of tokens highlighted: green when `color`, else
    between [ and ]."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    out = []
    for trained, tokens in runs:
        text = tokenizer.decode(tokens)
        if trained:
            text = f"{TRAINED_ON}{text}{TRAINED_OFF}" if color else f"[{text}]"
        out.append(text)
    return "".join(out)


def masks(path: str | Path, output: str | Path, prompts, max_length: int, show: str | None, color: bool,
          out=None) -> MaskReport:
    out = out or sys.stdout
    samples, report = build_masks(path, prompts, max_length)
    _write_jsonl(({"id": s.id, "input_ids": list(s.input_ids), "labels": list(s.labels),
                   "conversation": [m.model_dump() for m in c.messages]} for s, c in samples), output)
    print(f"{output}: {report.summary()}", file=out)
    if not samples:
        return report
    shown = samples[0][0] if show is None else next((s for s, _ in samples if s.id == show), None)
    if shown is None:
        raise ValueError(f"--show {show}: no sample with that id in {output}")
    print(f"sample {shown.id}: {len(shown.input_ids)} tokens, {shown.trained} trained "
          f"({'highlighted' if color else 'in [brackets]'}):", file=out)
    print(render_sample(prompts.tokenizer, shown, color), file=out)
    return report


# --- from-arena -------------------------------------------------------------------------------------------------


async def arena_conversations(bus, *, until: float | None = None, model: str | None = None,
                              winners: bool = False, anonymous_only: bool = True) -> tuple[list[dict], int]:
    """The conversations logged in ARENA (the last log of each), as OpenAI `messages` records
    the trainer reads; with `winners`, only the winning sides of votes. The second value counts
    the logs left out because the trainer could not train on them (roles out of order, no answer)."""
    from ..proto.events import ConversationLog, Vote
    from ..proto.replay import replay

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
    from .cli import _bus

    async with _bus(args) as bus:
        if args.pairs:
            from .pairs import read_arena_pairs, write_pairs

            pairs = await read_arena_pairs(bus, until=args.as_of, anonymous_only=not args.include_named)
            write_pairs(pairs, Path(args.output))
            print(f"{len(pairs)} preference pairs from ARENA written to {args.output}")
            return
        rows, unusable = await arena_conversations(bus, until=args.as_of, model=args.model, winners=args.winners,
                                                   anonymous_only=not args.include_named)
    _write_jsonl(rows, args.output)
    print(f"{len(rows)} conversations from ARENA written to {args.output}"
          + (f" ({unusable} left out: not trainable)" if unusable else ""))


# --- the command ------------------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser, common: Callable[[argparse.ArgumentParser], None]) -> None:
    parsers = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    c = parsers.add_parser("check", help="report every format and role-order error, with line and record id",
                           description="Check data files as the trainer reads them; exit status 1 on any error.")
    c.add_argument("files", nargs="+", help="conversations: ShareGPT or OpenAI messages, JSON or JSON Lines")
    common(c)

    c = parsers.add_parser("clean", help="drop empty or duplicate turns, blocked words, other scripts, duplicates",
                           description="Write the cleaned conversations as JSON Lines, in their own format.")
    c.add_argument("file")
    c.add_argument("--output", required=True, help="the cleaned file (JSON Lines)")
    c.add_argument("--blocked-words", help="a file of words or phrases, one a line: conversations with one go")
    c.add_argument("--keep-script", help="keep conversations mostly written in these scripts, e.g. latin or "
                   "latin,cyrillic (Unicode script names; cjk, japanese, korean)")
    c.add_argument("--min-script-share", type=float, default=0.5,
                   help="--keep-script: the share of letters that must be in those scripts (default: %(default)s)")
    c.add_argument("--keep-duplicates", action="store_true", help="keep conversations seen before in the file")
    common(c)

    c = parsers.add_parser("split", help="split long conversations at exchange boundaries to --max-length tokens",
                           description="Conversations longer than --max-length tokens (as the trainer renders them) "
                           "become pieces that fit, each with the system message; ids get #0, #1, ...")
    c.add_argument("file")
    _model_args(c)
    c.add_argument("--max-length", type=int, required=True)
    c.add_argument("--output", required=True)
    common(c)

    c = parsers.add_parser("stats", help="turns, tokens per role, sample length histogram")
    c.add_argument("files", nargs="+")
    _model_args(c)
    c.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help="count the samples longer than this (default: %(default)s)")
    c.add_argument("--json", action="store_true", help="print the numbers as JSON")
    common(c)

    c = parsers.add_parser("from-arena", help="export conversations or preference pairs from ARENA",
                           description="Conversations (OpenAI messages, JSON Lines) or, with --pairs, DPO "
                           "preference pairs ({prompt, chosen, rejected}) from the votes in ARENA.")
    c.add_argument("--output", required=True)
    c.add_argument("--pairs", action="store_true", help="preference pairs, as `train dpo --from-arena` uses them")
    c.add_argument("--as-of", type=float, help="events stored up to this unix time")
    c.add_argument("--model", help="conversations: only this model's")
    c.add_argument("--winners", action="store_true", help="conversations: only the winning sides of votes")
    c.add_argument("--include-named", action="store_true", help="votes of named battles too, not only anonymous")
    common(c)

    c = parsers.add_parser("masks", help="what the trainer trains on: input ids, labels, and one sample shown",
                           description="Write each sample's input_ids, labels (-100 where masked, aligned with the "
                           "inputs) and conversation, and show one sample with its trained tokens highlighted.")
    _model_args(c)
    c.add_argument("--data", required=True)
    c.add_argument("--output", required=True, help="MASKS.jsonl")
    c.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="as the trainer's (default: %(default)s)")
    c.add_argument("--show", metavar="ID", help="the sample to show (default: the first)")
    c.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="highlight in colour (auto: when the output is a terminal), else [brackets]")
    common(c)


def _model_args(p: argparse.ArgumentParser) -> None:
    from ..proto.default_model import DEFAULT_MODEL_NAME

    p.add_argument("--model-path", default=DEFAULT_MODEL_NAME,
                   help="the model whose tokenizer and chat template count (default: %(default)s)")
    p.add_argument("--template", "--conv-template", dest="template",
                   help="a built-in chat template instead of the model's own")


def _prompts(args):
    from transformers import AutoTokenizer

    from ..proto.templates import PromptBuilder
    from .service import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_base_model(args.model_path)))
    return PromptBuilder(tokenizer, args.template)


def main(args) -> int:
    """The file commands (all but from-arena): the exit status."""
    command = args.data_command
    if command == "check":
        return 1 if check(args.files) else 0
    if command == "clean":
        report = clean(args.file, args.output, read_blocked_words(args.blocked_words) if args.blocked_words else (),
                       parse_scripts(args.keep_script) if args.keep_script else None, args.min_script_share,
                       dedupe=not args.keep_duplicates)
        print(f"{args.output}: {report.summary()}")
        return 0
    if command == "split":
        counts = split(args.file, args.output, _prompts(args), args.max_length)
        print(f"{args.output}: {counts.get('read', 0)} conversations, {counts.get('split', 0)} split, "
              f"{counts['written']} written")
        return 0
    if command == "stats":
        stats = compute_stats(args.files, _prompts(args), args.max_length)
        print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
        return 0
    if command == "masks":
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        masks(args.data, args.output, _prompts(args), args.max_length, args.show, color)
        return 0
    raise ValueError(f"unknown data command {command!r}")


async def run(args, stop: asyncio.Event) -> None:
    if args.data_command == "from-arena":
        await from_arena(args)
        return
    status = await _in_thread(lambda: main(args), stop)
    if status:
        raise SystemExit(status)


async def _in_thread(work: Callable[[], int], stop: asyncio.Event) -> int:
    """`work` on a daemon thread, so that Ctrl-C ends the command at once, whatever it is doing."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def target() -> None:
        try:
            result = work()
        except BaseException as err:  # handed to the loop, raised there
            loop.call_soon_threadsafe(lambda error=err: done.done() or done.set_exception(error))
        else:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

    threading.Thread(target=target, name="chatfabric-data", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([done, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not done.done():
        raise SystemExit(130)
    return done.result()
