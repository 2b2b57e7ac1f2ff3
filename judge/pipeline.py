"""One judge job's work: every contestant answers a question (both turns, through the gateway),
then the judge grades what the job's mode asks for, each call's result stored before the next
depends on it. `Judging.run_question` is one question's life, top to bottom; a record already
stored is reused, so a job resumed on any service redoes nothing that was done.

The models are reached only with the `openai` SDK: its bounded retries with backoff cover 429,
5xx, connection errors and timeouts; what still fails raises `EndpointFailed`, and the job
fails saying why. An unreadable verdict is asked again up to `judge_retries` times, every raw
output kept; one that stays unreadable is stored as a failed judgment, never counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from itertools import combinations

import openai

from ..proto.events import JudgeJob
from . import store as keys
from .bench import Bench, BenchError, Question
from .results import summarize
from .scoring import judged_turns, game_winner, parse_rating, parse_verdict, prompt_name, render_pair, render_single
from .store import RecordStore


class EndpointFailed(RuntimeError):
    """A model endpoint failed past the SDK's retries: the job cannot finish."""


@dataclass(frozen=True)
class Endpoints:
    """The contestants' endpoint (the gateway) and the judge's (the gateway or another)."""

    contestants: openai.AsyncOpenAI
    judge: openai.AsyncOpenAI

    @classmethod
    def open(cls, gateway_url: str, judge_base_url: str | None, *, gateway_api_key: str | None,
             judge_api_key: str | None, max_retries: int, timeout: float) -> "Endpoints":
        def client(url: str, key: str | None) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=url, api_key=key or "unused", max_retries=max_retries, timeout=timeout)

        contestants = client(gateway_url, gateway_api_key)
        judge = client(judge_base_url, judge_api_key) if judge_base_url else contestants
        return cls(contestants, judge)

    async def close(self) -> None:
        await self.contestants.close()
        if self.judge is not self.contestants:
            await self.judge.close()


def contestants(job: JudgeJob) -> tuple[str, ...]:
    """Who answers: the models, and the baseline when it is not one of them."""
    extra = (job.baseline,) if job.baseline and job.baseline not in job.models else ()
    return (*job.models, *extra)


def pairs(job: JudgeJob) -> list[tuple[str, str]]:
    """(model_1, model_2) of every match, in FastChat's order."""
    if job.mode == "pairwise-baseline":
        return [(m, job.baseline) for m in job.models if m != job.baseline]
    if job.mode == "pairwise-all":
        return list(combinations(job.models, 2))
    return []


def answer_seed(job: JudgeJob, model: str, question_id) -> int:
    """Sampled answers are reproducible: a seed per job seed, model and question."""
    digest = hashlib.sha256(f"{job.seed}/{model}/{question_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def check_references(bench: Bench) -> None:
    """Refuse a bench whose reference-graded questions lack references, before any work."""
    for q in bench.questions:
        ref = bench.reference(q)
        if q.needs_reference and (not ref or len(ref) < len(q.turns)):
            raise BenchError(f"question {q.question_id!r} ({q.category}) is graded against a reference "
                             f"answer, and the bench has none for it")


class Judging:
    """One job's calls on one process. `limiter` bounds the calls in flight (`--parallel`)."""

    def __init__(self, job: JudgeJob, bench: Bench, store: RecordStore, endpoints: Endpoints,
                 limiter: asyncio.Semaphore, by: str):
        self.job, self.bench, self.store, self.endpoints = job, bench, store, endpoints
        self.limiter = limiter
        self.by = by  # which process did the work: recorded with it

    async def run_question(self, question: Question) -> None:
        """Answers, then judgments, then the question's done marker."""
        if await self.store.exists(keys.done_key(question.question_id)):
            return
        try:
            await self._work(question)
        except ExceptionGroup as group:  # the first failure says why; its siblings were cancelled
            raise first_error(group) from None
        await self.store.put(keys.done_key(question.question_id), {"question_id": question.question_id, "by": self.by})

    async def _work(self, question: Question) -> None:
        async with asyncio.TaskGroup() as tg:
            answers = {m: tg.create_task(self.answer(m, question)) for m in contestants(self.job)}
        texts = {m: task.result() for m, task in answers.items()}
        async with asyncio.TaskGroup() as tg:
            for turn in judged_turns(question):
                for model in self.job.models if self.job.mode == "single" else ():
                    tg.create_task(self.grade(model, question, turn, texts[model]))
                for m1, m2 in pairs(self.job):
                    for game in (1, 2):
                        tg.create_task(self.play(m1, m2, question, turn, game, texts))

    # -- answers -----------------------------------------------------------------------------

    async def answer(self, model: str, question: Question) -> tuple[str, ...]:
        """Both turns; turn 2 sees the model's own first answer."""
        messages, turns = [], []
        for turn, text in enumerate(question.turns, 1):
            messages.append({"role": "user", "content": text})
            record = await self.store.get(keys.answer_key(model, question.question_id, turn))
            if record is None:
                record = await self._generate(model, question, turn, messages)
                await self.store.put(keys.answer_key(model, question.question_id, turn), record)
            messages.append({"role": "assistant", "content": record["text"]})
            turns.append(record["text"])
        return tuple(turns)

    async def _generate(self, model: str, question: Question, turn: int, messages: list[dict]) -> dict:
        settings = {"temperature": question.temperature, "max_tokens": self.job.max_tokens}
        if question.temperature > 0:
            settings["seed"] = answer_seed(self.job, model, question.question_id)
        reply = await self._call(self.endpoints.contestants, f"answering with {model}", model=model,
                                 messages=list(messages), **settings)
        choice = reply.choices[0]
        return {"question_id": question.question_id, "model": model, "turn": turn,
                "text": choice.message.content or "", "finish_reason": choice.finish_reason,
                "settings": settings, "by": self.by, "tstamp": time.time()}

    # -- judgments ---------------------------------------------------------------------------

    async def grade(self, model: str, question: Question, turn: int, answer: tuple[str, ...]) -> dict:
        key = keys.single_key(model, question.question_id, turn)
        if (record := await self.store.get(key)) is not None:
            return record
        prompt = self.bench.prompts[prompt_name("single", question, turn)]
        user = render_single(prompt, question, answer, self.bench.reference(question), turn)
        score, outputs = await self._ask_judge(prompt.system_prompt, user, parse_rating)
        record = {"question_id": question.question_id, "model": model, "judge": [self.job.judge_model, prompt.name],
                  "user_prompt": user, "judgment": outputs[-1], "score": score, "turn": turn,
                  "category": question.category, "attempts": outputs, "failure": _failure(score, outputs),
                  "by": self.by, "tstamp": time.time()}
        await self.store.put(key, record)
        return record

    async def play(self, model_1: str, model_2: str, question: Question, turn: int, game: int,
                   answers: dict[str, tuple[str, ...]]) -> dict:
        """Game 1 shows model_1 as assistant A, game 2 swaps the positions."""
        key = keys.game_key(model_1, model_2, question.question_id, turn, game)
        if (record := await self.store.get(key)) is not None:
            return record
        prompt = self.bench.prompts[prompt_name("pairwise", question, turn)]
        a, b = (model_1, model_2) if game == 1 else (model_2, model_1)
        user = render_pair(prompt, question, answers[a], answers[b], self.bench.reference(question), turn)
        verdict, outputs = await self._ask_judge(
            prompt.system_prompt, user, lambda text: parse_verdict(text, prompt.output_format))
        record = {"question_id": question.question_id, "model_1": model_1, "model_2": model_2, "game": game,
                  "winner": "error" if verdict is None else game_winner(verdict, swapped=game == 2),
                  "judge": [self.job.judge_model, prompt.name], "user_prompt": user, "judgment": outputs[-1],
                  "turn": turn, "category": question.category, "attempts": outputs,
                  "failure": _failure(verdict, outputs), "by": self.by, "tstamp": time.time()}
        await self.store.put(key, record)
        return record

    async def _ask_judge(self, system: str, user: str, parse):
        """The judge at temperature 0, asked again (bounded) while its verdict is unreadable."""
        outputs = []
        for _ in range(1 + self.job.judge_retries):
            reply = await self._call(self.endpoints.judge, f"judging with {self.job.judge_model}",
                                     model=self.job.judge_model, temperature=0.0,
                                     max_tokens=self.job.judge_max_tokens,
                                     messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
            outputs.append(reply.choices[0].message.content or "")
            verdict = parse(outputs[-1])
            if verdict is not None:
                return verdict, outputs
        return None, outputs

    async def _call(self, client: openai.AsyncOpenAI, doing: str, **request):
        async with self.limiter:
            try:
                return await client.chat.completions.create(**request)
            except openai.APIStatusError as err:
                raise EndpointFailed(f"{doing} at {client.base_url}: HTTP {err.status_code}: {_message(err)}") from None
            except openai.APIConnectionError as err:  # includes timeouts
                raise EndpointFailed(f"{doing} at {client.base_url}: {type(err).__name__}: {err}") from None


def first_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _failure(verdict, outputs: list[str]) -> str | None:
    if verdict is not None:
        return None
    return f"no verdict in the judge's output after {len(outputs)} attempts"


def _message(err: openai.APIStatusError) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    return (inner.get("message") if isinstance(inner, dict) else None) or str(err)


# -- collecting a finished job ---------------------------------------------------------------------


async def collect(job: JudgeJob, bench: Bench, store: RecordStore) -> tuple[list[dict], list[dict]]:
    """Every stored answer (FastChat's model_answer rows) and judgment (its model_judgment rows)
    of the job; a record that is missing raises LookupError."""
    answers, judgments = [], []
    for q in bench.questions:
        for model in contestants(job):
            answers.append(await _answer_row(store, model, q))
        for turn in judged_turns(q):
            for model in job.models if job.mode == "single" else ():
                judgments.append(_single_row(await _need(store, keys.single_key(model, q.question_id, turn))))
            for m1, m2 in pairs(job):
                games = [await _need(store, keys.game_key(m1, m2, q.question_id, turn, g)) for g in (1, 2)]
                judgments.append(_pair_row(*games))
    return answers, judgments


async def _need(store: RecordStore, key: str) -> dict:
    record = await store.get(key)
    if record is None:
        raise LookupError(f"record {key} is missing")
    return record


async def _answer_row(store: RecordStore, model: str, q: Question) -> dict:
    turns = [await _need(store, keys.answer_key(model, q.question_id, t)) for t in range(1, len(q.turns) + 1)]
    return {"question_id": q.question_id, "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model}/{q.question_id}").hex,
            "model_id": model, "choices": [{"index": 0, "turns": [t["text"] for t in turns]}],
            "tstamp": turns[-1]["tstamp"], "settings": [t["settings"] for t in turns], "category": q.category}


def _single_row(record: dict) -> dict:
    return {k: record[k] for k in ("question_id", "model", "judge", "user_prompt", "judgment", "score", "turn",
                                   "tstamp", "category", "failure", "attempts")}


def _pair_row(g1: dict, g2: dict) -> dict:
    return {"question_id": g1["question_id"], "model_1": g1["model_1"], "model_2": g1["model_2"],
            "g1_winner": g1["winner"], "g2_winner": g2["winner"], "judge": g1["judge"],
            "g1_user_prompt": g1["user_prompt"], "g1_judgment": g1["judgment"],
            "g2_user_prompt": g2["user_prompt"], "g2_judgment": g2["judgment"], "turn": g1["turn"],
            "tstamp": max(g1["tstamp"], g2["tstamp"]), "category": g1["category"],
            "failure": g1["failure"] or g2["failure"], "g1_attempts": g1["attempts"], "g2_attempts": g2["attempts"]}


def summary_of(job: JudgeJob, bench: Bench, judgments: list[dict]) -> dict:
    """The job's tables, with the settings that produced them."""
    summary = summarize(judgments, job.mode, job.baseline, seed=job.seed)
    summary["job"] = {"name": job.job_name, "bench": bench.name, "questions": len(bench.questions),
                      "models": list(job.models), "judge_model": job.judge_model, "mode": job.mode,
                      "baseline": job.baseline, "max_tokens": job.max_tokens, "judge_max_tokens": job.judge_max_tokens,
                      "judge_retries": job.judge_retries, "seed": job.seed, "judgments": len(judgments)}
    return summary


def jsonl(rows: list[dict]) -> bytes:
    import json

    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
