"""Bringing the server in line with the contract (`proto/contract.py`): `ensure(js, spec)` creates
an object that is missing and reconciles one that exists. A setting JetStream can change in
place is updated (and logged); any other difference is refused with a `ContractMismatch` that
names the setting and both values."""

from __future__ import annotations

import logging
import math

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError

from .contract import (STREAM_NAME_IN_USE, STREAM_NOT_FOUND, ConsumerSpec, ContractMismatch, Difference, KeyValueSpec,
                       ObjectStoreSpec, Spec, StoreSpec, StreamSpec, missing_stream, plain)

log = logging.getLogger("chatfabric.proto.contract")


# -- comparing ---------------------------------------------------------------------------------


def _same(server: object, wanted: object) -> bool:
    server, wanted = plain(server), plain(wanted)
    if isinstance(server, (int, float)) and isinstance(wanted, (int, float)) and not isinstance(wanted, bool):
        return math.isclose(server, wanted, rel_tol=1e-9, abs_tol=1e-6)
    return server == wanted


def _fixed(setting: str, server: object, wanted: object) -> bool:
    """What JetStream refuses to change in place (checked against nats-server 2.15)."""
    if setting in ("storage", "ack_policy", "max_waiting"):
        return True
    workqueue = api.RetentionPolicy.WORK_QUEUE.value
    return setting == "retention" and workqueue in (plain(server), plain(wanted))


def differences(spec: Spec, server: api.StreamConfig | api.ConsumerConfig) -> list[Difference]:
    """The settings of `spec` that `server` (the object's configuration as the server reports
    it) does not have. A value the server leaves unset counts as JetStream's default."""
    sources = dict(spec.sources)
    found = []
    for setting, wanted in spec.settings().items():
        have = getattr(server, setting)
        if have is None and setting in ("max_age", "max_bytes"):
            have = 0.0 if setting == "max_age" else -1
        if not _same(have, wanted):
            found.append(Difference(setting, have, wanted, sources.get(setting), _fixed(setting, have, wanted)))
    return found


def mismatch(spec: Spec, found: list[Difference], reason: str) -> ContractMismatch:
    what = "; ".join(str(d) for d in found)
    remedy = ("delete it (every message in it is lost) and start again, or start this process with the "
              "fabric's settings" if isinstance(spec, (StreamSpec, KeyValueSpec, ObjectStoreSpec))
              else "delete the consumer (its workers then recreate it), or start this process with the fabric's settings")
    return ContractMismatch(f"{spec.label}: {what}; {reason}: {remedy}")


# -- ensuring ----------------------------------------------------------------------------------


async def ensure(js: JetStreamContext, spec: Spec) -> None:
    """Create `spec`'s object, or bring the existing one in line with it (see the module doc).
    Safe to run from several processes at once: JetStream makes creating the same object twice
    a no-op, and a concurrent creation with other settings is reconciled like any mismatch."""
    if isinstance(spec, ConsumerSpec):
        await _ensure_consumer(js, spec)
        return
    try:
        server = (await js.stream_info(spec.stream)).config
    except NotFoundError:
        server = await _create(js, spec)
        if server is None:
            return
    await _reconcile(js, spec, server)


async def _create(js: JetStreamContext, spec: StoreSpec) -> api.StreamConfig | None:
    """Create the object; None when it now exists as declared, else what another process made."""
    try:
        if isinstance(spec, StreamSpec):
            await js.add_stream(spec.config())
        elif isinstance(spec, KeyValueSpec):
            await js.create_key_value(bucket=spec.bucket, history=spec.history, ttl=spec.ttl or None,
                                      storage=spec.storage, replicas=spec.replicas,
                                      limit_marker_ttl=spec.limit_marker_ttl)
        else:
            await js.create_object_store(spec.bucket, storage=spec.storage, replicas=spec.replicas,
                                         max_bytes=spec.max_bytes)
    except BadRequestError as err:
        if err.err_code != STREAM_NAME_IN_USE:
            raise
        return (await js.stream_info(spec.stream)).config
    log.info("created %s", spec.label)
    return None


async def _reconcile(js: JetStreamContext, spec: StoreSpec, server: api.StreamConfig) -> None:
    found = differences(spec, server)
    if not found:
        return
    fixed = [d for d in found if d.fixed]
    if fixed:
        raise mismatch(spec, fixed, "JetStream cannot change that in place")
    try:
        await js.update_stream(server.evolve(**{d.setting: d.wanted for d in found}))
    except APIError as err:
        raise mismatch(spec, found, f"JetStream refused the update ({err.description})") from None
    for d in found:
        log.warning("%s: %s", spec.label, d.change())


async def _ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    try:
        server = (await js.consumer_info(spec.stream, spec.name)).config
    except NotFoundError as err:
        if err.err_code == STREAM_NOT_FOUND:
            raise missing_stream(spec.stream) from None
        server = None
    found = differences(spec, server) if server is not None else []
    fixed = [d for d in found if d.fixed]
    if fixed:
        raise mismatch(spec, fixed, "JetStream cannot change that in place")
    if server is not None and not found:
        return
    try:
        # creating a consumer that exists updates what may change and refuses the rest
        await js.add_consumer(spec.stream, config=spec.config())
    except NotFoundError:
        raise missing_stream(spec.stream) from None
    except APIError as err:
        raise mismatch(spec, found, f"JetStream refused the update ({err.description})") from None
    for d in found:
        log.warning("%s: %s", spec.label, d.change())
