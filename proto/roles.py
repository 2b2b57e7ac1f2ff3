"""The fabric's roles as data: one NATS user per role, with least-privilege permissions.

Each role (gateway, worker, arena, leaderboard, judge, trainer, admin) is a `Role`: the subjects it may
publish to and subscribe to, built from the contract's names, and the inbox prefix its
connections use. nats-py's JetStream API replies, pull fetches and watchers arrive on
`<prefix>.>`, so a role reads its own replies and never another role's (workers cannot read the
gateways' token plane `_INBOX.cf.>`). `auth.render_authorization` turns the roles into a
nats-server config; `docs/security.md` explains them and what NATS cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import subjects
from .subjects import (ARENA_PREFIX, ARENA_STREAM, ARTIFACT_BUCKETS, EVENTS_PREFIX, EVENTS_STREAM, JOBS_PREFIX,
                       JOBS_STREAM, JUDGE_BUCKET, JUDGE_CONSUMER, JUDGE_JOBS, LEADERBOARD_BUCKET, MODELS_BUCKET,
                       TRAIN_CONSUMER, TRAIN_JOBS, TRAINING_BUCKET)

# -- JetStream's own subjects -------------------------------------------------------------------

JS_API = "$JS.API"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def obj_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


# The leaderboard follower's durable consumer on ARENA and the object its snapshots replace.
LEADERBOARD_CONSUMER = "leaderboard"
LEADERBOARD_SNAPSHOT = "leaderboard/latest.json"


def _api(*tokens: str) -> str:
    return ".".join((JS_API, *tokens))


def contract_streams() -> tuple[str, ...]:
    """The stream behind every object of the contract (`proto/contract.py`; a test keeps the
    two equal): what a role that ensures the contract creates and reconciles."""
    return (subjects.GEN_STREAM, kv_stream(subjects.REGISTRY_BUCKET), ARENA_STREAM, JOBS_STREAM,
            EVENTS_STREAM, *(obj_stream(bucket) for bucket in ARTIFACT_BUCKETS))


def _stream_admin(stream: str) -> list[str]:
    """Create (idempotently) and look up one stream; never update, purge or delete it."""
    return [_api("STREAM.INFO", stream), _api("STREAM.CREATE", stream)]


def _stream_owner(stream: str) -> list[str]:
    """Create, look up and update one stream (`ensure` raises a limit the configuration
    raised); never purge or delete it."""
    return [*_stream_admin(stream), _api("STREAM.UPDATE", stream)]


def _stream_reader(stream: str) -> list[str]:
    """Read one stream: look it up, get messages, replay it with ordered (push) consumers or
    with the ephemeral pull consumers of `proto/replay.py`. Consumer creation is bounded to
    this stream; flow-control replies go to `$JS.FC`."""
    return [
        _api("STREAM.INFO", stream),
        _api("STREAM.NAMES"),  # nats-py's subscribe finds a stream by subject when not told
        _api("STREAM.MSG.GET", stream),
        _api("DIRECT.GET", stream),
        _api("DIRECT.GET", stream, ">"),
        _api("CONSUMER.CREATE", stream),
        _api("CONSUMER.CREATE", stream, ">"),
        _api("CONSUMER.INFO", stream, "*"),
        _api("CONSUMER.MSG.NEXT", stream, "*"),
        f"$JS.FC.{stream}.>",
    ]


def _pull_consumer(stream: str, consumer: str, filter_subject: str) -> list[str]:
    """Create, bind, fetch from and ack one durable pull consumer. nats-py creates a named
    consumer with `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, and the server refuses a
    body whose filter differs from the subject's, so this pins the filter too."""
    return [
        _api("CONSUMER.CREATE", stream, consumer, filter_subject),
        _api("CONSUMER.INFO", stream, consumer),
        _api("CONSUMER.MSG.NEXT", stream, consumer),
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _objects_reader(bucket: str) -> list[str]:
    return _stream_reader(obj_stream(bucket))


def _objects_writer(bucket: str) -> list[str]:
    """Write, replace and delete the objects of the one bucket a role owns. Replacing or deleting
    an object purges its old chunks, which NATS grants as a purge of the whole stream: of this
    bucket only, so a writer can lose its own objects but never another role's."""
    stream = obj_stream(bucket)
    return [*_objects_reader(bucket), *_stream_admin(stream), _api("STREAM.PURGE", stream), f"$O.{bucket}.>"]


# -- roles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Permissions:
    """Subjects allowed and denied for one direction (publish or subscribe); deny wins."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    """One NATS user of the fabric. `inbox_prefix` is what its connections pass to nats-py."""

    name: str
    summary: str
    publish: Permissions
    subscribe: Permissions
    inbox_prefix: str
    allow_responses: bool = False
    ensures_contract: bool = False  # creates and reconciles every stream, bucket and object store


# Refused to every role but admin even if an allow list grows: nobody removes streams, their
# messages or consumers, and nobody but the contract's owners (who may update its streams by
# name, see `_stream_owner`) edits a stream.
_NO_DELETING = (
    _api("STREAM.DELETE.>"),
    _api("STREAM.MSG.DELETE.>"),
    _api("CONSUMER.DELETE.>"),
)
_NO_STREAM_SURGERY = (_api("STREAM.UPDATE.>"), *_NO_DELETING)


def _role(name: str, summary: str, publish: list[str], subscribe: list[str],
          deny_publish: tuple[str, ...] = (), deny_subscribe: tuple[str, ...] = (),
          ensures_contract: bool = False) -> Role:
    inbox = f"_INBOX_{name}"
    refused = _NO_DELETING if ensures_contract else _NO_STREAM_SURGERY
    return Role(
        name=name,
        summary=summary,
        publish=Permissions(tuple(dict.fromkeys(publish)), refused + deny_publish),
        subscribe=Permissions(tuple(dict.fromkeys([*subscribe, f"{inbox}.>"])), deny_subscribe),
        inbox_prefix=inbox,
        ensures_contract=ensures_contract,
    )


def build_roles() -> dict[str, Role]:
    """Every role of the fabric, from the contract's subject names."""
    gen, registry = subjects.GEN_STREAM, kv_stream(subjects.REGISTRY_BUCKET)
    gen_all = f"{subjects.GEN_PREFIX}.>"
    gen_one = f"{subjects.GEN_PREFIX}.*"
    token_plane = f"{subjects.INBOX_PREFIX}.>"
    cancel = f"{subjects.CANCEL_PREFIX}.*"
    alive = f"{subjects.ALIVE_PREFIX}.*"
    gateway = _role(
        "gateway",
        "ensures the contract's streams, bucket and object store; publishes requests into GEN, reads "
        "the registry, relays token streams, sends cancels",
        publish=[
            *(subject for stream in contract_streams() for subject in _stream_owner(stream)),
            gen_all, _api("CONSUMER.INFO", gen, "*"),
            # creating a bucket with limit markers first reads the account's JetStream API level
            _api("INFO"), *_stream_reader(registry),
            cancel,
            # nak a delivery whose worker died before its first token (the worker's heartbeat
            # carries the ack subject), so it is redelivered now rather than after ack_wait
            f"$JS.ACK.{gen}.>",
        ],
        subscribe=[token_plane, alive],
        deny_publish=(token_plane, f"{subjects.ALIVE_PREFIX}.>", f"$KV.{subjects.REGISTRY_BUCKET}.>",
                      _api("STREAM.PURGE.>")),
        ensures_contract=True,
    )
    worker = _role(
        "worker",
        "pulls its model's requests from GEN, streams chunks to reply inboxes, keeps its card",
        publish=[
            # any model's consumer: workers share one role. (`gen.*` in the create subject also
            # matches a literal `gen.>` token; docs/security.md says what that allows.)
            _api("STREAM.INFO", gen), *_pull_consumer(gen, "*", gen_one),
            _api("STREAM.INFO", registry), f"$KV.{subjects.REGISTRY_BUCKET}.>",
            token_plane, alive, *_objects_reader(MODELS_BUCKET),
        ],
        subscribe=[cancel],
        deny_publish=(gen_all, f"{subjects.CANCEL_PREFIX}.>", _api("STREAM.CREATE.>"), _api("STREAM.PURGE.>")),
        deny_subscribe=(gen_all, token_plane),
    )
    arena = _role(
        "arena",
        "records votes and conversations in ARENA, replays it, submits and cancels judge jobs, reads their "
        "results and the leaderboard's snapshots",
        publish=[
            *_stream_admin(ARENA_STREAM), *_stream_reader(ARENA_STREAM), f"{ARENA_PREFIX}.>",
            *_stream_admin(JOBS_STREAM), JUDGE_JOBS, subjects.job_cancel_subject("*"),
            *_stream_reader(EVENTS_STREAM), *_objects_reader(JUDGE_BUCKET), *_objects_reader(LEADERBOARD_BUCKET),
        ],
        subscribe=[],
        deny_publish=(gen_all,),
    )
    leaderboard = _role(
        "leaderboard",
        "replays ARENA, follows it through its durable consumer `leaderboard`, writes its snapshots (bucket "
        "`leaderboard`)",
        publish=[
            *_stream_reader(ARENA_STREAM), *_pull_consumer(ARENA_STREAM, LEADERBOARD_CONSUMER, f"{ARENA_PREFIX}.>"),
            *_objects_writer(LEADERBOARD_BUCKET),
        ],
        subscribe=[],
        deny_publish=(gen_all, f"{ARENA_PREFIX}.>", f"{JOBS_PREFIX}.>", f"{EVENTS_PREFIX}.>"),
    )
    judge = _job_runner("judge", "takes judge jobs, publishes progress and results, writes its records and "
                        "results (bucket `judge`)", JUDGE_CONSUMER, JUDGE_JOBS, owns=(JUDGE_BUCKET,))
    trainer = _job_runner("trainer", "takes train jobs, publishes progress, writes models and adapters (bucket "
                          "`models`), checkpoints and job data (bucket `training`)", TRAIN_CONSUMER, TRAIN_JOBS,
                          owns=(MODELS_BUCKET, TRAINING_BUCKET))
    admin = Role(
        name="admin",
        summary="everything: the all-in-one launcher (`chatfabric up`) and operators",
        publish=Permissions((">",)),
        subscribe=Permissions((">",)),
        inbox_prefix="_INBOX_admin",
        ensures_contract=True,
    )
    return {r.name: r for r in (admin, gateway, worker, arena, leaderboard, judge, trainer)}


def _job_runner(name: str, summary: str, consumer: str, jobs: str, owns: tuple[str, ...]) -> Role:
    """A service that takes one kind of job. It may publish that kind (a judge fans a job out
    into parts on its own subject) but no other, reads EVENTS (a job's cancel) and ARENA (the
    judge's agreement with human votes, the trainer's preference pairs), and writes the object
    stores it `owns`."""
    other_jobs = tuple(subject for subject, _ in subjects.JOB_KINDS.values() if subject != jobs)
    return _role(
        name,
        summary,
        publish=[
            *_stream_reader(ARENA_STREAM),
            *_stream_admin(JOBS_STREAM), *_pull_consumer(JOBS_STREAM, consumer, jobs), jobs,
            *_stream_admin(EVENTS_STREAM), *_stream_reader(EVENTS_STREAM), f"{EVENTS_PREFIX}.>",
            *(subject for bucket in owns for subject in _objects_writer(bucket)),
        ],
        subscribe=[],
        deny_publish=(f"{subjects.GEN_PREFIX}.>", *other_jobs),
    )


ROLES: dict[str, Role] = build_roles()


def role(name: str) -> Role:
    """The role called `name`; a ValueError listing the roles for any other name."""
    try:
        return ROLES[name]
    except KeyError:
        raise ValueError(f"unknown role {name!r}; roles: {', '.join(ROLES)}") from None
