"""A benchmark is data: questions in FastChat's `question.jsonl` shape, reference answers in its
`reference_answer/*.jsonl` shape, and the judge prompts of `judge_prompts.jsonl`.

`load_bench(name)` reads a set that ships inside this package (`judge/data/<name>/`: MT-bench and
FastChat's judge prompts, read with `importlib.resources`, so an installed judge needs no data
folder); `parse_questions(text)` reads any question file, so another question set needs no code
(`--bench-file`), and `parse_prompts` any judge prompt file (`--prompts-file`). A question's own
`reference` turns are used when no reference file names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
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


def packaged_data() -> Traversable:
    """The judge's own data folder inside the installed package."""
    return resources.files(__package__) / "data"


def packaged_benches() -> list[str]:
    return sorted(entry.name for entry in packaged_data().iterdir() if (entry / "question.jsonl").is_file())


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
    """FastChat's eight MT-bench judge prompts, as packaged."""
    path = packaged_data() / "mt_bench" / "judge_prompts.jsonl"
    return parse_prompts(path.read_text(encoding="utf-8"), "judge_prompts.jsonl (packaged)")


def packaged_bench_text(name: str) -> tuple[str, str | None]:
    """A packaged question set's files: `<name>/question.jsonl` and, when present, the references
    of `<name>/reference_answer/gpt-4.jsonl`."""
    if name not in packaged_benches():
        raise BenchError(f"no packaged bench called {name!r} (packaged: {', '.join(packaged_benches())}); "
                         "give a question file with --bench-file")
    folder = packaged_data() / name
    ref = folder / "reference_answer" / "gpt-4.jsonl"
    return (folder / "question.jsonl").read_text(encoding="utf-8"), (ref.read_text(encoding="utf-8") if ref.is_file() else None)


def load_bench(name: str) -> Bench:
    """A packaged question set with its references and FastChat's judge prompts."""
    questions, references = packaged_bench_text(name)
    return bench_from_text(name, questions, f"{name}/question.jsonl", references)


def bench_from_text(name: str, questions: str, where: str = "questions", references: str | None = None,
                    prompts: dict[str, JudgePrompt] | None = None) -> Bench:
    refs = parse_references(references, f"{where} references") if references else {}
    return Bench(name, parse_questions(questions, where), refs, prompts if prompts is not None else default_prompts())


def bench_file_payload(questions: str, references: str | None, prompts: str | None = None) -> bytes:
    """What `--bench-file` / `--prompts-file` send with a job (and the service stores as an
    artifact): the question file, its references and, when replaced, the judge prompts."""
    return json.dumps({"questions": questions, "references": references, "prompts": prompts}).encode()


def bench_from_payload(name: str, payload: bytes) -> Bench:
    try:
        data = json.loads(payload)
        questions, references, prompts = data["questions"], data.get("references"), data.get("prompts")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BenchError("the bench file artifact is not a question file payload") from None
    return bench_from_text(name, questions, f"{name} (bench file)", references,
                           with_prompts_file(prompts, f"{name} (prompts file)") if prompts else None)


def with_prompts_file(text: str, where: str = "prompts file") -> dict[str, JudgePrompt]:
    """The packaged prompts with those of a prompts file (FastChat's judge_prompts.jsonl shape)
    put in their place by name; a name the judge never uses is an error, not silently ignored."""
    packaged = default_prompts()
    replaced = parse_prompts(text, where)
    unknown = sorted(set(replaced) - set(packaged))
    if unknown:
        raise BenchError(f"{where}: no judge prompt is called {', '.join(map(repr, unknown))} "
                         f"(the names: {', '.join(sorted(packaged))})")
    return {**packaged, **replaced}
