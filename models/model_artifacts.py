"""Models and adapters as artifacts: a folder packed into one tar object in the `models`
object store, named `models/<model name>.tar`, with its model card (`model_card.json`) inside. The
trainer packs and publishes them; a worker given `artifact://NAME` fetches and unpacks them.
Unpacking refuses members that would land outside the target folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

ARTIFACT_SCHEME = "artifact://"
MODEL_CARD = "model_card.json"


def model_artifact(name: str) -> str:
    return f"models/{name}.tar"


def checkpoint_artifact(job_id: str) -> str:
    """Where a train job's latest checkpoint is kept, so that any trainer can resume it."""
    return f"checkpoints/{job_id}.tar"


def artifact_name(ref: str) -> str | None:
    """NAME for `artifact://NAME`, None for anything else (a local path)."""
    return ref[len(ARTIFACT_SCHEME):] or None if ref.startswith(ARTIFACT_SCHEME) else None


def pack_folder(folder: Path) -> bytes:
    """The folder's files as an uncompressed tar (weights do not compress), in a stable order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(folder)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buffer.getvalue()


def unpack_folder(data: bytes, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(folder, filter="data")  # refuses absolute paths, '..', links out of the folder
    return folder


def read_card(folder: Path) -> dict:
    path = Path(folder) / MODEL_CARD
    return json.loads(path.read_text()) if path.is_file() else {}
