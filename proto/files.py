"""Files. Written whole or not at all: a command's output goes to a temporary file beside its
target, which replaces the target only once everything was written, so a crash, a Ctrl-C or a
lost connection never leaves half a file (nor the old one emptied). Read record by record: a
JSON array or JSON Lines file of records (battles, conversations), with the line of each."""

from __future__ import annotations

import contextlib
import json
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


class RecordError(ValueError):
    """A record file that cannot be read: the file, the line (None: the whole file) and why."""

    def __init__(self, path: Path | str, line: int | None, reason: str):
        super().__init__(f"{path}:{line}: {reason}" if line is not None else f"{path}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def json_records(path: Path | str) -> Iterator[tuple[int, object]]:
    """(line, value) for each record of a JSON array or JSON Lines file: an array's elements one
    at a time, each with the line it starts on; a JSON Lines file read line by line. A
    RecordError names the line and the reason at the first record that is not JSON."""
    try:
        with open(path, encoding="utf-8") as file:
            if _first_character(file) == "[":
                file.seek(0)
                yield from _array_records(file.read(), path)
            else:
                file.seek(0)
                yield from _line_records(file, path)
    except UnicodeDecodeError as err:
        raise RecordError(path, None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def _first_character(file) -> str:
    while chunk := file.read(4096):
        if stripped := chunk.lstrip():
            return stripped[0]
    return ""


def _not_json(err: json.JSONDecodeError) -> str:
    return f"not valid JSON: {err.msg} (column {err.colno})"


def _line_records(file, path) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(file, start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(path, number, _not_json(err)) from None
            except RecursionError:
                raise RecordError(path, number, "not valid JSON: nested too deeply") from None


def _array_records(text: str, path) -> Iterator[tuple[int, object]]:
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    line = text.count("\n", 0, position) + 1
    while True:
        start = _skip_space(text, position)
        line += text.count("\n", position, start)
        if text.startswith("]", start):
            if text[start + 1:].strip():
                raise RecordError(path, line, "text after the closing ']'")
            return
        try:
            record, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as err:
            raise RecordError(path, err.lineno, _not_json(err)) from None
        except RecursionError:
            raise RecordError(path, line, "not valid JSON: nested too deeply") from None
        yield line, record
        position = _skip_space(text, end)
        line += text.count("\n", start, position)
        if text.startswith(",", position):
            position += 1
        elif not text.startswith("]", position):
            raise RecordError(path, line, "expected ',' or ']' after a record")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
