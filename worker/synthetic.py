"""A zero-cost backend for measuring the fabric itself: it streams `max_tokens` tokens without
running any model, so gateway + NATS + worker overhead can be measured apart from compute.

Three paces: free-running (`token_delay=0`: each stream yields its next token as soon as the
event loop lets it), one sleep per token per stream (`token_delay`), or stepped (`step`): every
running sequence advances by one token per step, all together, as a batched decode does, and
a sequence's tokens wait for it when its reader is slower than the steps."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .backend import Sampling, TokenEvent


class _Sequence:
    __slots__ = ("produced", "wake")

    def __init__(self):
        self.produced = 0
        self.wake: asyncio.Future | None = None


class _Steps:
    """One decode step every `period` seconds while any sequence runs: each running sequence
    gets one more token. The schedule is fixed (a late step is not made up by running the next
    one early), so what a slow reader costs shows as tokens not delivered."""

    def __init__(self, period: float):
        self.period = period
        self.running: set[_Sequence] = set()
        self._task: asyncio.Task | None = None

    def join(self, seq: _Sequence) -> None:
        self.running.add(seq)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="synthetic steps")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while self.running:
            due = max(due + self.period, loop.time())
            await asyncio.sleep(due - loop.time())
            for seq in self.running:
                seq.produced += 1
                if seq.wake is not None and not seq.wake.done():
                    seq.wake.set_result(None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class SyntheticBackend:
    kind = "synthetic"
    device = "none"
    generation_defaults: dict = {}
    CONTEXT_LENGTH = 8192  # the context it serves unless told otherwise (--max-model-len)

    def __init__(self, tokenizer, context_length: int = CONTEXT_LENGTH, token_text: str = " hello", token_delay: float = 0.0,
                 step: float = 0.0):
        if token_delay < 0 or step < 0:
            raise ValueError("the synthetic backend's delay and step must not be negative")
        if token_delay and step:
            raise ValueError("the synthetic backend takes a per-token delay or a step, not both")
        self.tokenizer = tokenizer
        self.token_delay = token_delay  # seconds per token: a stand-in for a model's decode speed
        self._steps = _Steps(step) if step else None
        self.context_length = context_length
        self.eos_token_ids = frozenset()  # never stops early: every request gets max_tokens
        self.token_id = tokenizer(token_text, add_special_tokens=False)["input_ids"][0]
        self.kv_free_tokens = 1 << 30

    @property
    def running(self) -> int:
        """Sequences the stepped engine advances now (0 when it is not stepped)."""
        return len(self._steps.running) if self._steps is not None else 0

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[TokenEvent]:
        last = sampling.max_tokens
        if self._steps is None:
            for i in range(1, last + 1):
                yield TokenEvent(self.token_id, "length" if i == last else None)
                await asyncio.sleep(self.token_delay)  # let other requests' tokens through, as an engine step would
            return
        seq = _Sequence()
        self._steps.join(seq)
        loop = asyncio.get_running_loop()
        try:
            for i in range(1, last + 1):
                while seq.produced < i:
                    seq.wake = loop.create_future()
                    await seq.wake
                yield TokenEvent(self.token_id, "length" if i == last else None)
        finally:
            self._steps.running.discard(seq)  # finished, or closed early (cancelled)

    async def close(self) -> None:
        if self._steps is not None:
            await self._steps.close()
