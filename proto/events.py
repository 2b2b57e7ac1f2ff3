"""Pydantic models of the event plane: what the arena, the judge and the trainer record.

Every event is a fact with an `id`, its `Nats-Msg-Id`: publishing the same event again within
the duplicate window stores it once, so a retry never counts a vote twice. Each event type
knows its stream (`STREAM`), the subject filter that selects all of its kind (`SUBJECTS`) and
the subject of one event (`subject()`); `Bus.publish_event` stores one, `proto/replay.py`
reads them back. `ArtifactRef` points at an object in the `artifacts` store by name and
content digest. The request plane's messages live in `proto/messages.py`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .messages import ChatMessage, ModelName, SamplingParams, Text, _Message
from .subjects import (ARENA_STREAM, ARTIFACTS_BUCKET, CONVERSATION_PREFIX, EVENTS_PREFIX, EVENTS_STREAM,
                       JOBS_STREAM, JUDGE_JOBS, TRAIN_JOBS, VOTE_PREFIX, conversation_subject,
                       progress_subject, result_subject, vote_subject)

# Ids also appear as subject tokens (events.result.<job id>), hence the alphabet.
EventId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
Winner = Literal["model_a", "model_b", "tie", "tie (bothbad)"]
JobKind = Literal["judge", "train"]
Scalar = float | int | str | bool


def new_id() -> str:
    return uuid.uuid4().hex


class ArtifactRef(BaseModel):
    """An object in a JetStream object store, pinned by the sha256 of its content."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    bucket: str = ARTIFACTS_BUCKET
    name: str = Field(min_length=1, max_length=1024)
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Event(_Message):
    """A fact on the event plane; `at` is when it happened (unix time), not when it was stored."""

    STREAM: ClassVar[str]
    SUBJECTS: ClassVar[str]

    id: EventId = Field(default_factory=new_id)
    at: float = Field(default_factory=time.time)

    def subject(self) -> str:
        raise NotImplementedError


class Vote(Event):
    """A user's verdict on two answers. `anonymous`: the models were hidden when the user voted
    (a battle, which the leaderboard counts); `client` is a hash, never an address."""

    STREAM: ClassVar[str] = ARENA_STREAM
    SUBJECTS: ClassVar[str] = f"{VOTE_PREFIX}.>"

    winner: Winner
    model_a: ModelName
    model_b: ModelName
    anonymous: bool
    conversation_a: EventId  # the ConversationLog ids of both sides
    conversation_b: EventId
    client: str = Field(default="", max_length=128)

    def subject(self) -> str:
        return vote_subject(self.anonymous)


class ConversationLog(Event):
    """One side of a chat as the user saw it; its `id` is the conversation id a vote names."""

    STREAM: ClassVar[str] = ARENA_STREAM
    SUBJECTS: ClassVar[str] = f"{CONVERSATION_PREFIX}.>"

    model: ModelName
    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    sampling: SamplingParams = SamplingParams()
    client: str = Field(default="", max_length=128)

    def subject(self) -> str:
        return conversation_subject(self.model)


class JudgeJob(Event):
    """Judge `models`' answers to a benchmark's questions with `judge_model`."""

    STREAM: ClassVar[str] = JOBS_STREAM
    SUBJECTS: ClassVar[str] = JUDGE_JOBS

    bench: str = Field(default="mt_bench", pattern=r"^[A-Za-z0-9_-]+$")
    models: tuple[ModelName, ...] = Field(min_length=1)
    judge_model: ModelName

    def subject(self) -> str:
        return JUDGE_JOBS


class TrainJob(Event):
    """Fine-tune `base_model` on the conversations in `data` into a model served as `output_model`."""

    STREAM: ClassVar[str] = JOBS_STREAM
    SUBJECTS: ClassVar[str] = TRAIN_JOBS

    base_model: Text = Field(min_length=1)
    data: ArtifactRef
    output_model: ModelName
    method: Literal["sft", "lora"] = "lora"
    params: dict[str, Scalar] = Field(default_factory=dict)

    def subject(self) -> str:
        return TRAIN_JOBS


class JobProgress(Event):
    """How far a job is: `done` of `total` steps (None when unknown)."""

    STREAM: ClassVar[str] = EVENTS_STREAM
    SUBJECTS: ClassVar[str] = f"{EVENTS_PREFIX}.progress.>"

    job_id: EventId
    kind: JobKind
    done: int = Field(ge=0)
    total: int | None = Field(default=None, ge=0)
    message: str = ""

    def subject(self) -> str:
        return progress_subject(self.job_id)


class JobResult(Event):
    """How a job ended: `ok`, or `error` saying why not; what it produced."""

    STREAM: ClassVar[str] = EVENTS_STREAM
    SUBJECTS: ClassVar[str] = f"{EVENTS_PREFIX}.result.>"

    job_id: EventId
    kind: JobKind
    ok: bool
    error: str | None = None
    artifacts: tuple[ArtifactRef, ...] = ()
    summary: dict[str, Scalar] = Field(default_factory=dict)

    def subject(self) -> str:
        return result_subject(self.job_id)
