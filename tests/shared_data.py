"""Where tests and benchmarks find the public data kept beside the project (never the product:
what the judge needs ships inside the package): `$CHATFABRIC_SHARED_DATA`, else `../shared/data`
beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("CHATFABRIC_SHARED_DATA") or REPO.parent / "shared" / "data")


def shared_file(relative: str) -> Path:
    """A file of the shared data; a missing one fails the test with what to set."""
    path = shared_data_dir() / relative
    assert path.is_file(), f"{path} is missing: set CHATFABRIC_SHARED_DATA to the shared data folder"
    return path


SHAREGPT_FILE = "sharegpt/dummy_conversation.json"
