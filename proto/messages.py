"""Pydantic models of every message on the bus, and their encoding.

Every message carries `v`, the schema version. A reader validates what it receives with
`decode(...)`, which raises `MessageError` with a readable reason instead of a pydantic dump.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

SCHEMA_VERSION = 1


class MessageError(ValueError):
    """A bus message that is not valid JSON or does not match its schema."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: Literal[1] = SCHEMA_VERSION


class SamplingParams(BaseModel):
    """What the client asked of the sampler. `None` means: the model's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "SamplingParams":
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(_Message):
    """One generation, published on `gen.<model-token>` into the GEN stream."""

    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    model: str = Field(min_length=1)
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    sampling: SamplingParams = SamplingParams()
    reply_to: str = Field(min_length=1)
    deadline: float  # unix time after which the request is dropped, not served
    traceparent: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "GenerationRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of 'messages' and 'prompt' must be given")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) > self.deadline


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Chunk(_Message):
    """`seq` counts 0, 1, 2, ... within one delivery `attempt` of the request to one worker: a
    request handed back to JetStream and delivered again starts a new count."""

    request_id: str
    seq: int = Field(ge=0)
    worker_id: str
    attempt: int = Field(default=1, ge=1)


class DeltaChunk(_Chunk):
    """New text; `token_count` tokens were generated since the previous delta."""

    type: Literal["delta"] = "delta"
    text: str
    token_count: int = Field(ge=0)


class HeartbeatChunk(_Chunk):
    """Proof of life while a request is prefilling or between slow tokens.

    `started` says whether the first token was produced (and the request acked): a worker that
    dies before that leaves the request to be redelivered; one that dies after fails it."""

    type: Literal["heartbeat"] = "heartbeat"
    started: bool = False


FinishReason = Literal["stop", "length"]


class FinalChunk(_Chunk):
    type: Literal["final"] = "final"
    finish_reason: FinishReason
    usage: Usage


ErrorCode = Literal[
    "invalid_request",
    "context_length_exceeded",
    "deadline_exceeded",
    "cancelled",
    "worker_shutdown",
    "internal_error",
]


class ErrorChunk(_Chunk):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    param: str | None = None


Chunk = Annotated[DeltaChunk | HeartbeatChunk | FinalChunk | ErrorChunk, Field(discriminator="type")]
_CHUNK = TypeAdapter(Chunk)


class ModelCard(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    context_length: int = Field(ge=1)


class WorkerCard(_Message):
    """A worker's entry in the `workers` KV bucket, refreshed by heartbeat, expiring by TTL."""

    worker_id: str
    models: tuple[ModelCard, ...]
    backend: str
    device: str
    capacity: int = Field(ge=1)
    in_flight: int = Field(ge=0)
    version: str
    host: str
    pid: int
    started_at: float
    updated_at: float
    ttl: float = Field(gt=0, description="seconds after updated_at when this card is stale")

    def alive(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) <= self.updated_at + self.ttl


class CancelMessage(_Message):
    request_id: str
    reason: str = "client disconnected"


M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_defaults=False).encode()


def _explain(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "message"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def decode(model: type[M], data: bytes) -> M:
    try:
        return model.model_validate_json(data)
    except ValidationError as err:
        raise MessageError(f"invalid {model.__name__}: {_explain(err)}") from None


def decode_chunk(data: bytes) -> DeltaChunk | HeartbeatChunk | FinalChunk | ErrorChunk:
    try:
        return _CHUNK.validate_json(data)
    except ValidationError as err:
        raise MessageError(f"invalid chunk: {_explain(err)}") from None
