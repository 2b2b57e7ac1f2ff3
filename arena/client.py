"""The arena's only way to the models: the gateway's OpenAI API, through the official `openai`
SDK (async, streaming). Errors come back as `GatewayError`, whose text says what happened in
words a user can act on (busy, no worker, too long, unreachable), never a bare traceback."""

from __future__ import annotations

import asyncio
import math
import random
from typing import AsyncIterator, Mapping, Sequence

import openai
from opentelemetry import trace

from ..proto import tracing
from .session import Sampling

MODELS_MAX_AGE = 2.0  # seconds the list of live models is reused
_tracer = tracing.tracer("chatfabric.arena")


class GatewayError(Exception):
    """A request the gateway did not answer as asked; `str()` is the user-facing explanation."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _detail(err: openai.APIStatusError) -> str:
    """The gateway's own message: OpenAI's error body `{"error": {"message": ...}}`."""
    body = err.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return inner["message"]
    return err.message


def describe(err: Exception, model: str, base_url: str) -> GatewayError:
    """What went wrong, said as what it is."""
    if isinstance(err, openai.APIStatusError):
        status, detail = err.status_code, _detail(err)
        if status == 429:
            text = f"{model} is busy right now (429: {detail}). Try again in a moment."
        elif status == 503:
            text = f"No worker is serving {model} at the moment (503: {detail})."
        elif status == 404:
            text = f"The gateway does not know {model} (404: {detail})."
        elif status == 504:
            text = f"{model} did not answer in time (504: {detail})."
        elif status in (401, 403):
            text = f"The gateway refused the arena's API key ({status}: {detail})."
        elif status == 400 and "context" in detail.lower():
            text = f"The conversation is too long for {model}'s context ({detail}). Start a new round."
        else:
            text = f"The gateway answered {status}: {detail}"
        return GatewayError(text, status)
    if isinstance(err, openai.APITimeoutError):
        return GatewayError(f"No answer from the gateway at {base_url} in time.")
    if isinstance(err, openai.APIConnectionError):
        return GatewayError(f"The gateway at {base_url} is unreachable.")
    if isinstance(err, openai.APIError):  # an error event inside a stream
        return GatewayError(f"{model} stopped with an error: {err.message}")
    return GatewayError(f"{model}: {type(err).__name__}: {err}")


class Gateway:
    """One `AsyncOpenAI` client for the whole arena (its connection pool is shared by every
    browser session)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 300.0):
        self.base_url = base_url
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                         max_retries=0)
        self._models: tuple[str, ...] = ()
        self._listed_at = -math.inf
        self._lock = asyncio.Lock()

    async def models(self, max_age: float = MODELS_MAX_AGE) -> tuple[str, ...]:
        """The models some live worker serves now (the gateway's `/v1/models`), sorted."""
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if now - self._listed_at > max_age:
                try:
                    page = await self.client.models.list()
                except openai.OpenAIError as err:
                    raise describe(err, "the model list", self.base_url) from None
                self._models = tuple(sorted(m.id for m in page.data))
                self._listed_at = now
            return self._models

    async def stream(self, model: str, messages: Sequence[Mapping[str, str]], sampling: Sampling) -> AsyncIterator[str]:
        """The answer's text as it is generated. Leaving early closes the stream, and the
        gateway cancels the generation."""
        # not the current span: a generator that yields must not leave a context attached
        span = _tracer.start_span("arena.chat", kind=trace.SpanKind.CLIENT, attributes={"chatfabric.model": model})
        headers = {"traceparent": tracing.traceparent_of(span)} if span.is_recording() else None
        try:
            stream = await self.client.chat.completions.create(
                model=model, messages=list(messages), stream=True, extra_headers=headers, **sampling.as_dict())
            async with stream:
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
        except openai.OpenAIError as err:
            error = describe(err, model, self.base_url)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
            raise error from None
        finally:
            span.end()

    async def close(self) -> None:
        await self.client.close()


def draw_pair(models: Sequence[str], weights: Mapping[str, float], rng: random.Random) -> tuple[str, str]:
    """Two different models for a battle, each drawn with probability proportional to its
    weight (default 1; weight 0 keeps a model out of battles), in random order."""
    pool = [m for m in models if weights.get(m, 1.0) > 0]
    if len(pool) < 2:
        raise ValueError(f"a battle needs two models with a positive weight; live: {', '.join(models) or 'none'}")
    first = rng.choices(pool, [weights.get(m, 1.0) for m in pool])[0]
    rest = [m for m in pool if m != first]
    second = rng.choices(rest, [weights.get(m, 1.0) for m in rest])[0]
    pair = [first, second]
    rng.shuffle(pair)
    return pair[0], pair[1]
