"""The object plane: artifacts in the fabric's object stores (one per writer, `subjects.
ARTIFACT_BUCKETS`), written whole, read chunk by chunk with a bound on each wait, and pinned by
their sha256. `Bus` has these methods; they use its JetStream context and nothing else."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import nats.errors
from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from . import contract, subjects
from .bus_errors import ArtifactMismatch, BusUnavailable
from .events import ArtifactRef

# Reading an artifact: seconds to wait for each chunk, and how many versions to try when the
# object is replaced while it is read.
_CHUNK_WAIT = 5.0
_OBJECT_READ_ATTEMPTS = 5


class ObjectPlane:
    """Artifacts: the part of `Bus` that reads and writes the object stores."""

    js: JetStreamContext
    _stores: dict[str, ObjectStore]

    async def _object_store(self, bucket: str) -> ObjectStore:
        """One of the contract's object stores (`subjects.ARTIFACT_BUCKETS`), bound on first use."""
        if bucket not in subjects.ARTIFACT_BUCKETS:
            raise ValueError(f"no object store called {bucket!r} (the fabric's: {', '.join(subjects.ARTIFACT_BUCKETS)})")
        if bucket not in self._stores:
            try:
                self._stores[bucket] = await self.js.object_store(bucket)
            except BucketNotFoundError:
                raise contract.ContractMissing(
                    f"the '{bucket}' object store does not exist: a gateway creates it") from None
        return self._stores[bucket]

    async def put_artifact(self, bucket: str, name: str, data: bytes, description: str | None = None) -> ArtifactRef:
        """Store `data` as `name` in `bucket` (replacing an older version) and return a reference
        that pins this content by its sha256. A role writes only the bucket it owns."""
        store = await self._object_store(bucket)
        digest = hashlib.sha256(data).hexdigest()
        try:
            await store.put(name, data, meta=api.ObjectMeta(name=name, description=description))
        except (nats.errors.Error, TimeoutError) as err:  # the server is away: the caller may retry
            raise BusUnavailable(f"artifact {name!r} was not stored in '{bucket}': {err or type(err).__name__}") from err
        return ArtifactRef(bucket=bucket, name=name, digest=f"sha256:{digest}", size=len(data))

    async def get_artifact(self, ref: ArtifactRef) -> bytes:
        """The content `ref` points at; `ArtifactMismatch` when the stored object is not it (it
        was replaced since, or damaged)."""
        data = await self._read_object(ref.bucket, ref.name)
        if data is None:
            raise ArtifactMismatch(f"artifact {ref.name!r} is not in '{ref.bucket}'")
        found = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if found != ref.digest or len(data) != ref.size:
            raise ArtifactMismatch(f"artifact {ref.name!r} changed since it was referenced: "
                                   f"{ref.digest} ({ref.size} bytes) wanted, {found} ({len(data)} bytes) stored")
        return data

    async def read_artifact(self, bucket: str, name: str) -> bytes | None:
        """The current content stored as `name` in `bucket`, or None when there is none
        (unpinned: for records a process keeps and finds again by name, such as a judge's answers)."""
        return await self._read_object(bucket, name)

    async def _read_object(self, bucket: str, name: str) -> bytes | None:
        """Read `name` chunk by chunk, waiting at most `_CHUNK_WAIT` for each. nats-py's own
        `ObjectStore.get` waits forever, and keeps its subscription, when the object is replaced
        while it is read (the new version's `put` purges the old chunks): here such a read starts
        over on the new version."""
        store = await self._object_store(bucket)
        nuid = None
        for _ in range(_OBJECT_READ_ATTEMPTS):
            try:
                info = await store.get_info(name)
            except ObjectNotFoundError:
                return None
            if info.nuid == nuid:  # the same version again: its chunks are gone, not replaced
                break
            nuid = info.nuid
            if not info.size:
                return b""
            data = await self._read_chunks(info)
            if data is not None:
                return data
        raise ArtifactMismatch(f"artifact {name!r} is damaged: its chunks could not be read "
                               f"within {_CHUNK_WAIT:g} s each")

    async def _read_chunks(self, info: api.ObjectInfo) -> bytes | None:
        """The chunks of one version of an object, checked against its digest; None when a chunk
        did not come within `_CHUNK_WAIT` (the version was replaced meanwhile, or is damaged)."""
        sub = await self.js.subscribe(f"$O.{info.bucket}.C.{info.nuid}", ordered_consumer=True)
        digest, parts = hashlib.sha256(), []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=_CHUNK_WAIT)
                except nats.errors.TimeoutError:
                    return None
                digest.update(msg.data)
                parts.append(msg.data)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        wanted = base64.urlsafe_b64decode(info.digest.split("=", 1)[1]) if info.digest else None
        if wanted is not None and digest.digest() != wanted:
            raise ArtifactMismatch(f"artifact {info.name!r} is damaged: its chunks do not match its digest")
        return b"".join(parts)

    async def has_artifact(self, bucket: str, name: str) -> bool:
        """Whether an object called `name` is stored in `bucket` (one lookup, its content not read)."""
        store = await self._object_store(bucket)
        try:
            await store.get_info(name)
            return True
        except ObjectNotFoundError:
            return False
