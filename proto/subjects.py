"""Subject, stream, consumer and bucket names of every plane, and the reversible model-name mapping.

NATS subject tokens cannot hold '.', '*', '>' or whitespace, and consumer names cannot hold '/'
either. A model name is mapped to a token made only of [A-Za-z0-9_-] by escaping every other
byte of its UTF-8 form as '=XX' (hex); '=' itself is escaped, so the mapping is reversible.

Model names are bounded before any subject is built: a subject longer than the server's control
line (4 KiB) makes nats-server drop the whole connection, and a consumer name longer than 255
bytes cannot be created. `check_model_name` is the one rule; the gateway and the message models
apply it at their edges, and `model_token` refuses anything it rejects.
"""

from __future__ import annotations

import re

# -- request, token and control planes --------------------------------------------------------

GEN_STREAM = "GEN"
GEN_PREFIX = "gen"
CANCEL_PREFIX = "ctl.cancel"
ALIVE_PREFIX = "ctl.alive"
REGISTRY_BUCKET = "workers"
INBOX_PREFIX = "_INBOX.cf"

# -- event plane --------------------------------------------------------------------------------

ARENA_STREAM = "ARENA"
ARENA_PREFIX = "arena"  # arena.vote.<kind>, arena.conv.<model-token>
VOTE_PREFIX = f"{ARENA_PREFIX}.vote"
CONVERSATION_PREFIX = f"{ARENA_PREFIX}.conv"
FEEDBACK_PREFIX = f"{ARENA_PREFIX}.feedback"  # arena.feedback.<kind>: direct-chat up/down votes, flags
JOBS_STREAM = "JOBS"
JOBS_PREFIX = "jobs"
JUDGE_JOBS = f"{JOBS_PREFIX}.judge"
TRAIN_JOBS = f"{JOBS_PREFIX}.train"
JUDGE_CONSUMER = "judge"  # the judges' durable pull consumer on JOBS, filtered on JUDGE_JOBS
TRAIN_CONSUMER = "trainer"  # the trainers' one, filtered on TRAIN_JOBS
# job kind -> (its subject in JOBS, the durable consumer that takes it)
JOB_KINDS = {"judge": (JUDGE_JOBS, JUDGE_CONSUMER), "train": (TRAIN_JOBS, TRAIN_CONSUMER)}
EVENTS_STREAM = "EVENTS"
EVENTS_PREFIX = "events"  # events.progress.<job>, events.result.<job>, events.cancel.<job>
# JetStream object stores, one per writer, so that each role replaces and purges only its own
# objects and everyone else only reads them (docs/security.md).
MODELS_BUCKET = "models"  # the trainer's published models and adapters (workers serve them)
TRAINING_BUCKET = "training"  # the trainer's checkpoints and the data of submitted train jobs
JUDGE_BUCKET = "judge"  # the judge's answers, judgments and results
LEADERBOARD_BUCKET = "leaderboard"  # the leaderboard follower's snapshots
ARTIFACT_BUCKETS = (MODELS_BUCKET, TRAINING_BUCKET, JUDGE_BUCKET, LEADERBOARD_BUCKET)

MAX_MODEL_NAME_CHARS = 256
# The consumer name `gen-<token>` must stay within JetStream's 255-byte name limit.
MAX_MODEL_TOKEN_CHARS = 240

_SAFE = re.compile(rb"[A-Za-z0-9_-]")
_SAFE_BYTES = bytes(b for b in range(256) if _SAFE.match(bytes([b])))
_TOKEN = re.compile(r"^(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+$")


def check_model_name(model: str) -> str:
    """Return `model` if it can name a model on the bus; raise ValueError saying why not."""
    if not isinstance(model, str) or not model:
        raise ValueError("a model name must be a non-empty string")
    if len(model) > MAX_MODEL_NAME_CHARS:
        raise ValueError(f"a model name is at most {MAX_MODEL_NAME_CHARS} characters, got {len(model)}")
    try:
        encoded = model.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a model name must be valid Unicode text (it holds an unpaired surrogate)") from None
    # every byte counts 1, and 2 more when it is escaped (a replay validates two names a vote)
    escaped = len(encoded) + 2 * len(encoded.translate(None, _SAFE_BYTES))
    if escaped > MAX_MODEL_TOKEN_CHARS:
        raise ValueError(
            f"this model name is too long for the bus once escaped ({escaped} of at most "
            f"{MAX_MODEL_TOKEN_CHARS} characters; letters, digits, '_' and '-' count 1, other bytes 3)"
        )
    return model


def model_token(model: str) -> str:
    """Map a model name to a subject token (reversible, see `model_from_token`)."""
    check_model_name(model)
    out = []
    for byte in model.encode("utf-8"):
        char = bytes([byte])
        out.append(char.decode() if _SAFE.match(char) else f"={byte:02X}")
    return "".join(out)


def model_from_token(token: str) -> str:
    """Inverse of `model_token`; raises ValueError on a string it could not have produced."""
    if not _TOKEN.match(token):
        raise ValueError(f"not a model token: {token!r}")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(token[i]))
            i += 1
    return raw.decode("utf-8")


def gen_subject(model: str) -> str:
    """The request subject of one model in the GEN stream."""
    return f"{GEN_PREFIX}.{model_token(model)}"


def gen_consumer(model: str) -> str:
    """The durable pull consumer shared by every worker of one model."""
    return f"gen-{model_token(model)}"


def cancel_subject(request_id: str) -> str:
    return f"{CANCEL_PREFIX}.{request_id}"


def cancel_wildcard() -> str:
    return f"{CANCEL_PREFIX}.*"


def alive_subject(worker_id: str) -> str:
    """Where a worker announces, every heartbeat interval, that its process is alive."""
    return f"{ALIVE_PREFIX}.{worker_id}"


def alive_wildcard() -> str:
    return f"{ALIVE_PREFIX}.*"


def reply_inbox(gateway_id: str) -> str:
    """Where workers send one gateway the chunks of all its requests, as `ChunkBatch` messages
    (each chunk names its request): one subject, one subscription, whatever the streams."""
    return f"{INBOX_PREFIX}.{gateway_id}"


def arena_kind(subject: str) -> str | None:
    """What an `ARENA` subject holds: "vote", "conv" (a conversation log) or "feedback"; None
    for anything else."""
    for kind, prefix in (("vote", VOTE_PREFIX), ("conv", CONVERSATION_PREFIX), ("feedback", FEEDBACK_PREFIX)):
        if subject.startswith(f"{prefix}."):
            return kind
    return None


def vote_subject(anonymous: bool) -> str:
    """Votes from anonymous battles and from named side-by-side chats stay apart: the
    leaderboard counts only the former, and a replay filters on the subject alone."""
    return f"{VOTE_PREFIX}.{'anonymous' if anonymous else 'named'}"


def conversation_subject(model: str) -> str:
    return f"{CONVERSATION_PREFIX}.{model_token(model)}"


def feedback_subject(kind: str) -> str:
    return f"{FEEDBACK_PREFIX}.{kind}"


def job_subject(kind: str) -> str:
    try:
        return JOB_KINDS[kind][0]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; kinds: {', '.join(JOB_KINDS)}") from None


def progress_subject(job_id: str) -> str:
    return f"{EVENTS_PREFIX}.progress.{job_id}"


def result_subject(job_id: str) -> str:
    return f"{EVENTS_PREFIX}.result.{job_id}"


def job_cancel_subject(job_id: str) -> str:
    """Where a job's cancel is recorded: stored, so a runner that pulls the job later sees it."""
    return f"{EVENTS_PREFIX}.cancel.{job_id}"


def job_events(job_id: str) -> str:
    """Every event about one job: its progress, its result and its cancel."""
    return f"{EVENTS_PREFIX}.*.{job_id}"
