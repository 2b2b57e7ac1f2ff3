"""A benchmark is data: questions in FastChat's `question.jsonl` shape, reference answers in its
`reference_answer/*.jsonl` shape, and the judge prompts of `judge_prompts.jsonl`.

`load_bench(name)` reads a named set from the shared data folder (`$CHATFABRIC_SHARED_DATA`,
else `../shared/data` beside the repository); `parse_questions(text)` reads any question file, so
another question set needs no code (`--bench-file`). A question's own `reference` turns are used
when no reference file names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..proto.events import QuestionId

# FastChat's llm_judge/common.py: categories graded against a reference answer, and the
# temperature each category's answers are sampled at (any other category: 0.7).
NEED_REF_CATS = frozenset({"math", "reasoning", "coding", "arena-hard-200"})
TEMPERATURES = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7
MAX_QUESTIONS = 10_000


class BenchError(ValueError):
    """A question, reference or prompt file that cannot be used, and why (file and line)."""


class Question(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    question_id: QuestionId
    category: str = Field(min_length=1, max_length=128)
    turns: tuple[str, ...] = Field(min_length=1, max_length=2)
    reference: tuple[str, ...] | None = None
    required_temperature: float | None = Field(default=None, ge=0.0, le=2.0)

    @property
    def temperature(self) -> float:
        if self.required_temperature is not None:
            return self.required_temperature
        return TEMPERATURES.get(self.category, DEFAULT_TEMPERATURE)

    @property
    def needs_reference(self) -> bool:
        return self.category in NEED_REF_CATS


class JudgePrompt(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str
    type: Literal["single", "pairwise"]
    system_prompt: str
    prompt_template: str
    output_format: Literal["[[rating]]", "[[A]]", "[[rating_a,rating_b]]"]


@dataclass(frozen=True)
class Bench:
    name: str
    questions: tuple[Question, ...]
    references: dict[QuestionId, tuple[str, ...]] = field(default_factory=dict)
    prompts: dict[str, JudgePrompt] = field(default_factory=dict)

    def question(self, question_id: QuestionId) -> Question:
        for q in self.questions:
            if q.question_id == question_id:
                return q
        raise BenchError(f"{self.name} has no question {question_id!r}")

    def reference(self, question: Question) -> tuple[str, ...] | None:
        return self.references.get(question.question_id) or question.reference

    def subset(self, question_ids) -> "Bench":
        """The questions named, in the file's order; a BenchError names any it lacks."""
        wanted = list(question_ids)
        if not wanted:
            return self
        known = {q.question_id for q in self.questions}
        missing = [qid for qid in wanted if qid not in known]
        if missing:
            raise BenchError(f"{self.name} has no question {', '.join(map(repr, missing[:5]))}")
        chosen = set(wanted)
        return Bench(self.name, tuple(q for q in self.questions if q.question_id in chosen),
                     self.references, self.prompts)


def shared_data_dir() -> Path:
    return Path(os.environ.get("CHATFABRIC_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _lines(text: str, where: str):
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchError(f"{where}:{number}: not JSON: {err.msg}") from None


def _model(model, value, where: str, number: int):
    try:
        return model.model_validate(value)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        place = ".".join(str(p) for p in first["loc"]) or "line"
        raise BenchError(f"{where}:{number}: {place}: {first['msg']}") from None


def parse_questions(text: str, where: str = "questions") -> tuple[Question, ...]:
    """Questions from a FastChat question file; BenchError names the line that is wrong."""
    questions = [_model(Question, value, where, n) for n, value in _lines(text, where)]
    if not questions:
        raise BenchError(f"{where}: no questions")
    if len(questions) > MAX_QUESTIONS:
        raise BenchError(f"{where}: {len(questions)} questions, at most {MAX_QUESTIONS}")
    seen: set = set()
    for q in questions:
        if q.question_id in seen:
            raise BenchError(f"{where}: question_id {q.question_id!r} appears twice")
        seen.add(q.question_id)
    return tuple(questions)


def parse_references(text: str, where: str = "references") -> dict[QuestionId, tuple[str, ...]]:
    """FastChat's reference answers (a model answer file): question id -> turns of choice 0."""
    refs = {}
    for number, value in _lines(text, where):
        try:
            refs[value["question_id"]] = tuple(value["choices"][0]["turns"])
        except (KeyError, IndexError, TypeError):
            raise BenchError(f"{where}:{number}: wants question_id and choices[0].turns") from None
    return refs


def parse_prompts(text: str, where: str = "judge prompts") -> dict[str, JudgePrompt]:
    prompts = [_model(JudgePrompt, value, where, n) for n, value in _lines(text, where)]
    return {p.name: p for p in prompts}


def default_prompts() -> dict[str, JudgePrompt]:
    path = shared_data_dir() / "mt_bench" / "judge_prompts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: set CHATFABRIC_SHARED_DATA to the shared data folder")
    return parse_prompts(path.read_text(), str(path))


def load_bench(name: str) -> Bench:
    """A named question set from the shared data folder: `<name>/question.jsonl`, with the
    references of `<name>/reference_answer/gpt-4.jsonl` when present."""
    folder = shared_data_dir() / name
    path = folder / "question.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: no bench called {name!r} "
                                f"(set CHATFABRIC_SHARED_DATA, or give a question file)")
    return bench_from_text(name, path.read_text(), str(path), _reference_text(folder))


def _reference_text(folder: Path) -> str | None:
    ref = folder / "reference_answer" / "gpt-4.jsonl"
    return ref.read_text() if ref.is_file() else None


def bench_from_text(name: str, questions: str, where: str = "questions", references: str | None = None,
                    prompts: dict[str, JudgePrompt] | None = None) -> Bench:
    refs = parse_references(references, f"{where} references") if references else {}
    return Bench(name, parse_questions(questions, where), refs, prompts if prompts is not None else default_prompts())


def bench_file_payload(questions: str, references: str | None) -> bytes:
    """What `--bench-file` stores as an artifact: the question file and its references."""
    return json.dumps({"questions": questions, "references": references}).encode()


def bench_from_payload(name: str, payload: bytes) -> Bench:
    try:
        data = json.loads(payload)
        questions, references = data["questions"], data.get("references")
    except (ValueError, KeyError, TypeError):
        raise BenchError("the bench file artifact is not a question file payload") from None
    return bench_from_text(name, questions, f"{name} (bench file)", references)
