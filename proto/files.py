"""Files written whole or not at all: a command's output goes to a temporary file beside its
target, which replaces the target only once everything was written, so a crash, a Ctrl-C or a
lost connection never leaves half a file (nor the old one emptied)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator, TextIO


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[TextIO]:
    """A text file to write `path` through: it becomes `path` when the block ends normally
    and is removed when it raises. `mode` applies from the first byte (0o600: owner only)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write all of `data` to `path`, or leave `path` as it was."""
    with atomic_writer(path, mode) as f:
        if isinstance(data, bytes):
            f.buffer.write(data)
        else:
            f.write(data)
