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

Every command but `from-arena` works on files alone, without a NATS server. Each command's work
is a module of `data_tools/`; this one holds their flags and runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from typing import Callable

from .data_tools.check import check
from .data_tools.clean import clean, parse_scripts, read_blocked_words
from .data_tools.from_arena import from_arena
from .data_tools.masks import masks
from .data_tools.records import DEFAULT_MAX_LENGTH
from .data_tools.split import split
from .data_tools.stats import compute_stats, format_stats



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
    from ..models.default_model import DEFAULT_MODEL_NAME

    p.add_argument("--model-path", default=DEFAULT_MODEL_NAME,
                   help="the model whose tokenizer and chat template count (default: %(default)s)")
    p.add_argument("--template", "--conv-template", dest="template",
                   help="a built-in chat template instead of the model's own")


def _prompts(args):
    from transformers import AutoTokenizer

    from ..models.templates import PromptBuilder
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
