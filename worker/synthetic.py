"""A zero-cost backend for measuring the fabric itself: it streams `max_tokens` tokens without
running any model, so gateway + NATS + worker overhead can be measured apart from compute."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .backend import Sampling, TokenEvent


class SyntheticBackend:
    kind = "synthetic"
    device = "none"
    generation_defaults: dict = {}

    def __init__(self, tokenizer, context_length: int = 8192, token_text: str = " hello", token_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.token_delay = token_delay  # seconds per token: a stand-in for a model's decode speed
        self.context_length = context_length
        self.eos_token_ids = frozenset()  # never stops early: every request gets max_tokens
        self.token_id = tokenizer(token_text, add_special_tokens=False)["input_ids"][0]
        self.kv_free_tokens = 1 << 30

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[TokenEvent]:
        for i in range(1, sampling.max_tokens + 1):
            yield TokenEvent(self.token_id, "length" if i == sampling.max_tokens else None)
            await asyncio.sleep(self.token_delay)  # let other requests' tokens through, as an engine step would

    async def close(self) -> None:
        pass
