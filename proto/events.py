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
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .messages import ChatMessage, ModelName, SamplingParams, Text, _Message
from .subjects import (ARENA_STREAM, ARTIFACT_BUCKETS, CONVERSATION_PREFIX, EVENTS_PREFIX, EVENTS_STREAM,
                       FEEDBACK_PREFIX, JOBS_STREAM, JUDGE_JOBS, TRAIN_JOBS, VOTE_PREFIX, conversation_subject,
                       feedback_subject, job_cancel_subject, model_token, progress_subject, result_subject,
                       vote_subject)

# Ids also appear as subject tokens (events.result.<job id>), hence the alphabet.
EventId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
ClientHash = Annotated[str, Field(max_length=128)]  # a salted hash of the client, never its address
Winner = Literal["model_a", "model_b", "tie", "tie (bothbad)"]
WINNERS: tuple[Winner, ...] = get_args(Winner)  # in this order: the arena's winner codes
JobKind = Literal["judge", "train"]
Scalar = float | int | str | bool
JudgeMode = Literal["single", "pairwise-baseline", "pairwise-all"]
# FastChat's question ids are numbers (MT-bench) or strings (other sets)
QuestionId = int | Annotated[str, Field(min_length=1, max_length=128)]
Url = Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
MAX_JOB_ID = 96  # a judge job's parts are named `<job id>-p<index>`, within EventId's 128


def new_id() -> str:
    return uuid.uuid4().hex


class ArtifactRef(BaseModel):
    """An object in a JetStream object store, pinned by the sha256 of its content."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    bucket: Literal[ARTIFACT_BUCKETS]  # the writer's own object store (`subjects.ARTIFACT_BUCKETS`)
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
    client: ClientHash = ""

    def subject(self) -> str:
        return vote_subject(self.anonymous)


class ConversationLog(Event):
    """One side of a chat as the user saw it; its `id` is the conversation id a vote names."""

    STREAM: ClassVar[str] = ARENA_STREAM
    SUBJECTS: ClassVar[str] = f"{CONVERSATION_PREFIX}.>"

    model: ModelName
    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    sampling: SamplingParams = SamplingParams()
    client: ClientHash = ""

    def subject(self) -> str:
        return conversation_subject(self.model)


class Feedback(Event):
    """A user's verdict on one model's answers in a direct chat (no opponent, so no rating):
    `upvote`, `downvote`, or `flag` (the answer should be reviewed)."""

    STREAM: ClassVar[str] = ARENA_STREAM
    SUBJECTS: ClassVar[str] = f"{FEEDBACK_PREFIX}.>"

    kind: Literal["upvote", "downvote", "flag"]
    model: ModelName
    conversation: EventId  # the ConversationLog it is about
    client: ClientHash = ""

    def subject(self) -> str:
        return feedback_subject(self.kind)


class JudgeJob(Event):
    """Judge `models`' answers to a benchmark's questions with `judge_model` (`judge/`).

    The questions are the named `bench` (a set packaged with the judge) or, when `bench_data` or
    `bench_file` is set, that question file (FastChat's question.jsonl shape, references
    optional; `judge.bench.bench_file_payload`). A judge service
    fans a job out into parts, one `JudgeQuestion` per question. `id` is one submission (its Nats-Msg-Id);
    `name` is the job: answers and judgments are stored under it, so a job submitted again
    under its name resumes where it stopped and redoes nothing. Progress, result and cancel
    events carry the name as their `job_id`. API keys never travel on the bus: each service
    uses its own."""

    STREAM: ClassVar[str] = JOBS_STREAM
    SUBJECTS: ClassVar[str] = JUDGE_JOBS

    bench: str = Field(default="mt_bench", pattern=r"^[A-Za-z0-9_-]+$")
    models: tuple[ModelName, ...] = Field(min_length=1)
    judge_model: ModelName
    mode: JudgeMode = "single"
    baseline: ModelName | None = None  # pairwise-baseline: every model against this one
    bench_data: str | None = Field(default=None, max_length=4 << 20)  # a question file sent inline
    bench_file: ArtifactRef | None = None  # ...which the service stores: its parts point at it
    questions: tuple[QuestionId, ...] = Field(default=(), max_length=10_000)  # a subset; empty: all
    gateway_url: Url | None = None  # where the contestants answer; None: the service's own
    judge_base_url: Url | None = None  # the judge's OpenAI-compatible endpoint; None: the gateway
    max_tokens: int = Field(default=1024, ge=1, le=65536)  # per answer turn (FastChat: 1024)
    judge_max_tokens: int = Field(default=2048, ge=1, le=65536)  # per judgment (FastChat: 2048)
    parallel: int = Field(default=8, ge=1, le=256)  # calls at once, per service
    judge_retries: int = Field(default=2, ge=0, le=10)  # more judge calls for an unparseable judgment
    seed: int = Field(default=0, ge=0, le=2**31 - 1)  # sampled answers are seeded from it
    name: EventId | None = None  # None: the id

    @property
    def job_name(self) -> str:
        return self.name or self.id

    @model_validator(mode="after")
    def _consistent(self) -> "JudgeJob":
        if len(self.id) > MAX_JOB_ID:
            raise ValueError(f"a judge job id is at most {MAX_JOB_ID} characters, got {len(self.id)}")
        if self.bench_data is not None and self.bench_file is not None:
            raise ValueError("bench_data and bench_file: give one, not both")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model is named twice")
        if self.mode == "pairwise-baseline" and self.baseline is None:
            raise ValueError("baseline: mode pairwise-baseline needs a baseline model")
        if self.mode != "pairwise-baseline" and self.baseline is not None:
            raise ValueError(f"baseline: only mode pairwise-baseline takes one, not {self.mode}")
        if self.mode == "pairwise-all" and len(self.models) < 2:
            raise ValueError("models: mode pairwise-all needs at least two models")
        if self.mode == "pairwise-baseline" and self.models == (self.baseline,):
            raise ValueError("models: pairwise-baseline needs a model besides the baseline")
        return self

    def subject(self) -> str:
        return JUDGE_JOBS


class JudgeQuestion(Event):
    """One question of a judge job (`job`, as planned: its question file stored as `bench_file`),
    fanned out by the service that planned it on the job's subject, for any service to take.
    Its `id` is `<job id>-p<index>`."""

    STREAM: ClassVar[str] = JOBS_STREAM
    SUBJECTS: ClassVar[str] = JUDGE_JOBS

    job: JudgeJob
    question: QuestionId

    @property
    def job_name(self) -> str:
        return self.job.job_name

    @model_validator(mode="after")
    def _planned(self) -> "JudgeQuestion":
        if self.job.bench_data is not None:
            raise ValueError("job: a question's job points at its stored question file (bench_file), not inline data")
        return self

    def subject(self) -> str:
        return JUDGE_JOBS


JudgeWork = Annotated[JudgeJob | JudgeQuestion, Field(union_mode="smart")]  # what `jobs.judge` carries


class TrainJob(Event):
    """Fine-tune `base_model` (a model folder on the trainer's machine, or the default model's
    name) on `data` into a model published as `output_model` (`trainer/`): `sft` trains every
    weight, `lora` an adapter, `dpo` an adapter on preference pairs. `params` are the run's
    settings (`trainer.settings.TrainSettings`). The job's checkpoints are stored under its id,
    so a redelivered job resumes where its last trainer stopped."""

    STREAM: ClassVar[str] = JOBS_STREAM
    SUBJECTS: ClassVar[str] = TRAIN_JOBS

    base_model: Text = Field(min_length=1)
    data: ArtifactRef
    eval_data: ArtifactRef | None = None
    output_model: ModelName
    method: Literal["sft", "lora", "dpo"] = "lora"
    params: dict[str, Scalar | None] = Field(default_factory=dict)

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
    metrics: dict[str, Scalar] = Field(default_factory=dict)  # a train job's loss, lr, tokens/s, ETA...

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


class JobCancel(Event):
    """A request to stop a job. Stored, so that a runner that pulls the job (or one of its
    parts) later drops it, and heard at once by the runners that are running it."""

    STREAM: ClassVar[str] = EVENTS_STREAM
    SUBJECTS: ClassVar[str] = f"{EVENTS_PREFIX}.cancel.>"

    job_id: EventId
    kind: JobKind
    reason: str = Field(default="", max_length=1024)

    def subject(self) -> str:
        return job_cancel_subject(self.job_id)


class ModelPublished(Event):
    """A trained model or adapter stored as `artifact` (`proto/model_artifacts.py`), servable as
    `artifact://<model>`; `card` holds its model card's headline (base model, data, metrics)."""

    STREAM: ClassVar[str] = EVENTS_STREAM
    SUBJECTS: ClassVar[str] = f"{EVENTS_PREFIX}.model.published.>"

    model: ModelName
    artifact: ArtifactRef
    kind: Literal["adapter", "model"]
    base_model: Text
    job_id: EventId | None = None
    card: dict[str, Scalar] = Field(default_factory=dict)

    def subject(self) -> str:
        return f"{EVENTS_PREFIX}.model.published.{model_token(self.model)}"


JOB_EVENTS: tuple[type[Event], ...] = (JobProgress, JobResult, JobCancel)


def job_event_model(subject: str) -> type[Event] | None:
    """Which of the job events is stored on `subject` (None: none of them)."""
    for model in JOB_EVENTS:
        if subject.startswith(model.SUBJECTS[:-1]):
            return model
    return None
