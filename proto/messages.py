"""Models of every message on the bus, and their encoding.

Every message carries `v`, the schema version. A reader validates what it receives with
`decode(...)` (`decode_chunks` for the token plane), which raises `MessageError` with a readable
reason instead of a validation dump. Messages are pydantic models, except the token plane's
chunks: msgspec structs, as its traffic is per token.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, TypeVar

import msgspec
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .subjects import check_model_name

SCHEMA_VERSION = 1

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # tokens with a logit bias per request
MAX_TOKEN_ID = 2**31 - 1
INT64 = 2**63


def _utf8(text: str) -> str:
    """Text on the bus must encode as UTF-8: JSON lets a client send an unpaired surrogate
    (`"\\ud800"`), which no encoder downstream accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"must be valid Unicode text (unpaired surrogate at position {err.start})") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
ModelName = Annotated[str, AfterValidator(check_model_name)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class MessageError(ValueError):
    """A bus message that is not valid JSON or does not match its schema."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: Literal[1] = SCHEMA_VERSION


class SamplingFields(BaseModel):
    """The sampling fields an OpenAI body and a request on the bus share, each with its rule,
    defined once: `SamplingParams` (the bus) and the gateway's request schema both take them
    from here, and the arena checks its sliders with them. `None` means: the model's default."""

    model_config = ConfigDict(allow_inf_nan=False)

    max_tokens: int | None = Field(default=None, ge=1, lt=INT64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOKEN_ID)
    min_tokens: int = Field(default=0, ge=0, lt=INT64)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    ignore_eos: bool = False


class SamplingParams(SamplingFields):
    """What the client asked of the sampler, as a request carries it on the bus: the shared
    fields and the stop conditions and logit bias in their bus shapes. The gateway builds it
    from an OpenAI body (so a bad value is a 400 naming the field), the worker decodes it, and
    every backend reads the same resolved values (`worker/params.py: resolve_sampling`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    stop: tuple[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)], ...] = Field(
        default=(), max_length=MAX_STOP
    )
    stop_token_ids: tuple[TokenId, ...] = Field(default=(), max_length=MAX_STOP_TOKEN_IDS)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS
    )

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must not exceed max_tokens ({max_tokens})")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: Text


class GenerationRequest(_Message):
    """One generation, published on `gen.<model-token>` into the GEN stream."""

    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    model: ModelName
    messages: tuple[ChatMessage, ...] | None = None
    prompt: Text | tuple[TokenId, ...] | None = None
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


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# -- the token plane --------------------------------------------------------------------------
# Chunks are the hot path (one per token and stream, at thousands per second): msgspec structs,
# validated when decoded like every other message, and encoded as compact arrays. A worker sends
# a gateway one `ChunkBatch` per engine step (`proto/outbox.py`), whatever the number of streams.

Count = Annotated[int, msgspec.Meta(ge=0)]
Attempt = Annotated[int, msgspec.Meta(ge=1)]


class _Chunk(msgspec.Struct, frozen=True, array_like=True, tag_field="type"):
    """`seq` counts 0, 1, 2, ... within one delivery `attempt` of the request to one worker: a
    request handed back to JetStream and delivered again starts a new count."""

    request_id: str
    seq: Count
    worker_id: str
    attempt: Attempt


class DeltaChunk(_Chunk, tag="delta"):
    """New text; `token_count` tokens were generated since the previous delta."""

    text: str
    token_count: Count


class HeartbeatChunk(_Chunk, tag="heartbeat"):
    """Proof of life while a request is prefilling or between slow tokens.

    `started` says whether the first token was produced (and the request acked): a worker that
    dies before that leaves the request to be redelivered; one that dies after fails it. Until
    then `ack_subject` is the JetStream delivery's reply subject, so that a gateway that sees
    the worker die can hand the request back at once instead of waiting for `ack_wait`."""

    started: bool = False
    ack_subject: str | None = None


FinishReason = Literal["stop", "length"]


class FinalChunk(_Chunk, tag="final"):
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


class ErrorChunk(_Chunk, tag="error"):
    code: ErrorCode
    message: str
    param: str | None = None


Chunk = DeltaChunk | HeartbeatChunk | FinalChunk | ErrorChunk


class ChunkBatch(msgspec.Struct, frozen=True):
    """What a worker sends to one gateway's reply inbox: the chunks of any of its streams, each
    stream's in order."""

    chunks: list[Chunk]
    v: Literal[1] = SCHEMA_VERSION


_BATCH_ENCODER = msgspec.json.Encoder()
_BATCH_DECODER = msgspec.json.Decoder(ChunkBatch)


def encode_chunks(chunks: list[Chunk]) -> bytes:
    return _BATCH_ENCODER.encode(ChunkBatch(chunks))


def decode_chunks(data: bytes) -> list[Chunk]:
    """The chunks of one batch; `MessageError` naming what is wrong with it."""
    try:
        return _BATCH_DECODER.decode(data).chunks
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise MessageError(f"invalid chunk batch: {err}") from None


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
    heartbeat_interval: float = Field(default=1.0, gt=0, description="seconds between its AliveMessages")
    kv_cache_tokens: int | None = None  # its KV cache budget, when the backend has one
    kv_free_tokens: int | None = None  # of which not reserved by running requests

    def alive(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) <= self.updated_at + self.ttl


class AliveMessage(_Message):
    """Published by a worker on `ctl.alive.<worker_id>` every heartbeat interval, from its event
    loop (never blocked by compute): gateways tell a dead worker from a busy one by it."""

    worker_id: str
    in_flight: int = Field(ge=0)


class CancelMessage(_Message):
    request_id: str
    reason: str = "client disconnected"


M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_defaults=False).encode()


def explain(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "message"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def decode(model: type[M], data: bytes) -> M:
    try:
        return model.model_validate_json(data)
    except ValidationError as err:
        raise MessageError(f"invalid {model.__name__}: {explain(err)}") from None


