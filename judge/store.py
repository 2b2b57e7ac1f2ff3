"""Where a judge job keeps its answers and judgments, one record per key, so that any service
that takes the job (or a part of it) later finds them: the fabric's `artifacts` object store
(`judge/<job name>/...`) for a service, a folder for `judge run --local`. A record is written
once its work is done and read back instead of being done again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Protocol

from ..proto.bus import Bus
from ..proto.files import write_atomic
from ..proto.subjects import JUDGE_BUCKET, model_token

PREFIX = "judge"


def token(value) -> str:
    """A key segment for a model name or question id: reversible and safe in any store."""
    return f"i{value}" if isinstance(value, int) else f"s{model_token(str(value))}"


def answer_key(model: str, question_id, turn: int) -> str:
    return f"answer/{token(model)}/{token(question_id)}/turn{turn}"


def single_key(model: str, question_id, turn: int) -> str:
    return f"judgment/single/{token(question_id)}/turn{turn}/{token(model)}"


def game_key(model_1: str, model_2: str, question_id, turn: int, game: int) -> str:
    return f"judgment/pair/{token(question_id)}/turn{turn}/{token(model_1)}/{token(model_2)}/g{game}"


def done_key(question_id) -> str:
    return f"done/{token(question_id)}"


PLAN_KEY = "plan"
RESULT_KEYS = {"summary": "results/summary.json", "judgments": "results/judgments.jsonl",
               "answers": "results/answers.jsonl"}


class RecordStore(Protocol):
    async def get(self, key: str) -> dict | None: ...
    async def put(self, key: str, record: dict) -> None: ...
    async def exists(self, key: str) -> bool: ...


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode()


class BusStore:
    """Records as objects of the judge's object store, under `judge/<job name>/`."""

    def __init__(self, bus: Bus, job_name: str):
        self.bus = bus
        self.prefix = f"{PREFIX}/{job_name}/"

    def name(self, key: str) -> str:
        return self.prefix + key

    async def get(self, key: str) -> dict | None:
        data = await self.bus.read_artifact(JUDGE_BUCKET, self.name(key))
        return None if data is None else json.loads(data)

    async def put(self, key: str, record: dict) -> None:
        await self.bus.put_artifact(JUDGE_BUCKET, self.name(key), _encode(record))

    async def exists(self, key: str) -> bool:
        return await self.bus.has_artifact(JUDGE_BUCKET, self.name(key))


class DirStore:
    """Records as JSON files under a folder (`judge run --local`), written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    async def get(self, key: str) -> dict | None:
        return await asyncio.to_thread(self._read, self.path(key))

    async def put(self, key: str, record: dict) -> None:
        await asyncio.to_thread(self._write, self.path(key), _encode(record))

    async def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
