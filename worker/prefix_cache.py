"""The KV of finished sequences, kept so that a request starting with the same tokens (the next
turn of a conversation, a shared long system prompt) prefills only what follows them.

An entry is one finished sequence: its token ids (prompt and answer, less the last token, whose
KV was never computed) and, per layer, its keys and values ([1, kv_heads, tokens, head_dim]).
The KV at a position depends only on the tokens up to it, so any common prefix of a prompt and
an entry can be reused, however the two go on. A reusable prefix is at least `min_tokens` long,
so only entries that begin with a prompt's first `min_tokens` tokens are compared with it (they
are indexed by those). Entries are kept least recently used first and
counted in tokens; the engine evicts them whenever the KV budget is wanted by running requests
(`evict_to`), so cached and reserved tokens together never exceed the budget.

Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values


class PrefixCache:
    def __init__(self, min_tokens: int):
        if min_tokens < 1:
            raise ValueError("min_tokens must be positive")
        self.min_tokens = min_tokens  # shorter common prefixes are not reused (see `match`)
        self._entries: OrderedDict[tuple[int, ...], Layers] = OrderedDict()
        self._by_head: dict[tuple[int, ...], set[tuple[int, ...]]] = {}  # first min_tokens tokens -> entries
        self.tokens = 0  # held, over all entries
        self.hits = 0  # prompts that reused a prefix
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to it

    def match(self, prompt: Sequence[int]) -> tuple[int, Layers] | None:
        """The longest prefix of `prompt` that an entry holds, at most all but its last token
        (whose logits the first sampled token needs), as (length, that entry's layers); None
        when it is shorter than `min_tokens`. A hit makes the entry the most recently used."""
        best, best_key = 0, None
        for key in self._by_head.get(tuple(prompt[: self.min_tokens]), ()) if len(prompt) > self.min_tokens else ():
            n = _common_prefix(key, prompt, len(prompt) - 1)
            if n > best:
                best, best_key = n, key
        if best < self.min_tokens:
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, self._entries[best_key]

    def add(self, tokens: Sequence[int], layers: Layers, room: int) -> bool:
        """Keep a finished sequence's KV, within `room` tokens for the whole cache (older entries
        go first). Entries it extends are dropped: it holds all they do; one that extends it
        stands for it (and becomes the most recently used). False when it is too short to be
        reused or larger than `room`."""
        key = tuple(tokens)
        if len(key) < self.min_tokens or len(key) > room:
            return False
        head = key[: self.min_tokens]
        same_head = self._by_head.get(head, set())
        for held in same_head:
            if len(held) >= len(key) and held[: len(key)] == key:
                self._entries.move_to_end(held)
                self.evict_to(room)
                return held in self._entries
        for old in [k for k in same_head if key[: len(k)] == k]:
            self._drop(old)
        self._entries[key] = layers
        self._by_head.setdefault(head, set()).add(key)
        self.tokens += len(key)
        self.evict_to(room)
        return True

    def evict_to(self, limit: int) -> None:
        """Drop the least recently used entries until at most `limit` tokens are held."""
        while self.tokens > max(limit, 0) and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        head = key[: self.min_tokens]
        self._by_head[head].discard(key)
        if not self._by_head[head]:
            del self._by_head[head]
        self.tokens -= len(key)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
