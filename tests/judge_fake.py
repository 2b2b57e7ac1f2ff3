"""A deterministic OpenAI-compatible server for the judge's tests: real HTTP (aiohttp on a free
port), canned outputs, every request recorded. A request with a system message is a judge call
(`judge(user_prompt)` picks its output); any other is a contestant's turn, answered with a text
that names the model, the question and the turn, so a judge prompt shows who answered what."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web


def contestant_answer(model: str, question: str, turn: int) -> str:
    return f"ANSWER[{model}|{question[:24]}|turn {turn}]"


@dataclass
class FakeOpenAI:
    judge: Callable[[str], str] = lambda prompt: "Fine. Rating: [[5]]"
    statuses: list[int] = field(default_factory=list)  # answered first, one per request, then 200s
    gate: asyncio.Event | None = None  # when set up, held requests wait for it
    held: Callable[[dict], bool] = lambda body: True  # which requests the gate holds
    open_at: int | None = None  # open the gate once this many requests are held at once
    requests: list[dict] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _holding: int = 0

    async def __aenter__(self) -> "FakeOpenAI":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        if self.gate is not None:
            self.gate.set()
        await self._runner.cleanup()

    def judge_requests(self) -> list[dict]:
        return [r for r in self.requests if r["messages"][0]["role"] == "system"]

    def answer_requests(self) -> list[dict]:
        return [r for r in self.requests if r["messages"][0]["role"] != "system"]

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.arrived.set()
        if self.statuses:
            status = self.statuses.pop(0)
            return web.json_response({"error": {"message": f"canned {status}", "type": "test"}}, status=status,
                                     headers={"retry-after-ms": "5"})
        if self.gate is not None and self.held(body):
            self._holding += 1
            if self.open_at is not None and self._holding >= self.open_at:
                self.gate.set()
            try:
                await self.gate.wait()
            finally:
                self._holding -= 1
        messages = body["messages"]
        if messages[0]["role"] == "system":
            text = self.judge(messages[-1]["content"])
        else:
            users = [m["content"] for m in messages if m["role"] == "user"]
            text = contestant_answer(body["model"], users[0], len(users))
        return web.json_response({
            "id": f"cmpl-{len(self.requests)}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })


def dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)
