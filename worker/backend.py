"""The engine-agnostic seam between a worker and the thing that runs the model.

A backend takes prompt token ids and resolved sampling parameters and yields one `TokenEvent`
per generated token, as an async iterator. Closing the iterator aborts the generation and frees
whatever the backend held for it. A backend stops by itself on a stop token or at `max_tokens`;
stop strings, detokenization and the bus are the worker's business, not the backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from ..proto.messages import FinishReason

# As in vLLM: a temperature below this only turns rounding into noise, so it samples greedily.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters with every default resolved and `max_tokens` clamped to the context."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()  # the model's EOS ids plus the client's
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class KVCacheFull(Exception):
    """The request fits the KV cache budget, but not next to what is running now: retry later."""


class TooLargeForCache(ValueError):
    """The request alone needs more KV cache than the engine's whole budget."""


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    finish_reason: FinishReason | None = None  # set on the last token


class Backend(Protocol):
    """What a worker needs from an engine."""

    kind: str  # "hf", "vllm", ...
    device: str
    context_length: int
    eos_token_ids: frozenset[int]
    tokenizer: object  # a Hugging Face tokenizer: prompts are rendered and decoded with it
    generation_defaults: dict  # the model's own sampling defaults (temperature, top_p, ...)
    kv_free_tokens: int  # KV cache tokens not reserved by running requests

    # generate raises TooLargeForCache for a request that can never fit, and KVCacheFull for
    # one that does not fit next to the running ones (retry later).

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[TokenEvent]: ...

    async def close(self) -> None: ...
