"""`chatfabric data stats FILE...`: conversations, turns and tokens per role, sample lengths as
rendered for training, a length histogram."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from ..masks import MaskReport, Sample, render_with_mask
from .records import DEFAULT_MAX_LENGTH, scan, warn


HISTOGRAM_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192)


def _tokens(prompts, text: str) -> int:
    return len(prompts.encode(text, add_special_tokens=False)) if text else 0


def compute_stats(paths: Sequence[str | Path], prompts, max_length: int = DEFAULT_MAX_LENGTH,
                  report_line: Callable[[str], None] = warn) -> dict:
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
                tokens[m.role] += _tokens(prompts, m.content)
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
