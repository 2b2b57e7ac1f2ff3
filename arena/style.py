"""Style counts of an answer's text, as FastChat's arena counts them for style control:
length, markdown headers, list items and bold spans, with code blocks left out of the markdown
counts (fastchat/serve/monitor/add_markdown_info.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from .ratings import style_differences

_CODE_BLOCK = re.compile(r"```([^`]*)```")
_HEADERS = [re.compile(rf"^#{{{level}}}\s", re.MULTILINE) for level in range(1, 7)]
_LIST_ITEMS = [re.compile(r"^\s*\d+\.\s", re.MULTILINE), re.compile(r"^\s*[-*+]\s", re.MULTILINE)]
_BOLD = [re.compile(r"\*\*[^*\n]+\*\*"), re.compile(r"__[^_\n]+__")]


def without_code(text: str) -> str:
    # FastChat deletes every occurrence of each code block's inner text (anywhere in the
    # answer, fences kept); done the same way so the counts agree with its metadata.
    for block in _CODE_BLOCK.findall(text):
        text = text.replace(block, "")
    return text


def _count(patterns: list[re.Pattern], text: str) -> int:
    return sum(len(pattern.findall(text)) for pattern in patterns)


def style_counts(answer: str, count_tokens: Callable[[str], int] = len) -> np.ndarray:
    """[length, headers, list items, bold spans] of one answer (assistant turns joined by a
    newline). Length is `count_tokens(answer)`: characters by default; FastChat's metadata counts
    tokens, so pass a tokenizer's counter to reproduce its numbers."""
    prose = without_code(answer)
    return np.array([
        count_tokens(answer), _count(_HEADERS, prose), _count(_LIST_ITEMS, prose), _count(_BOLD, prose),
    ], dtype=np.float64)


def pair_style(answer_a: str, answer_b: str, count_tokens: Callable[[str], int] = len) -> np.ndarray:
    """The four style differences of a pair, (a - b) / (a + b + 1) per count, before the
    standardization over all battles that `ratings.style_features` applies."""
    return style_differences(style_counts(answer_a, count_tokens), style_counts(answer_b, count_tokens))


def assistant_text(conversation: Sequence[dict]) -> str:
    """The assistant turns of an OpenAI-format conversation, joined by newlines."""
    return "\n".join(turn["content"] for turn in conversation if turn["role"] == "assistant")
