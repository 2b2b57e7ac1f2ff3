"""FastChat's judging rules as pure functions: which prompt grades which turn of which question,
the text it renders, and how a verdict is read from the judge's output.

A verdict that cannot be read is None, never a magic number; `combine_games` turns a pairwise
match's two games (positions swapped) into one outcome, where two games that disagree are
"inconsistent" and count as a tie, as in FastChat's `show_result.py`.
"""

from __future__ import annotations

import re
from typing import Literal

from .bench import BenchError, JudgePrompt, Question

Kind = Literal["single", "pairwise"]
Verdict = Literal["A", "B", "tie"]
GameWinner = Literal["model_1", "model_2", "tie"]
Outcome = Literal["model_1", "model_2", "tie", "inconsistent"]

# FastChat's llm_judge/common.py patterns: the published format first, then its fallback.
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
TWO_SCORE = re.compile(r"\[\[(\d+\.?\d*),\s?(\d+\.?\d*)\]\]")
TWO_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*),\s?(\d+\.?\d*)\]")
TIE_DELTA = 0.1


def prompt_name(kind: Kind, question: Question, turn: int) -> str:
    """FastChat's judges: reference-guided for math, reasoning and coding; the multi-turn
    variant grades turn 2 with the whole conversation in view."""
    if kind == "single":
        name = "single-math-v1" if question.needs_reference else "single-v1"
    else:
        name = "pair-math-v1" if question.needs_reference else "pair-v2"
    return f"{name}-multi-turn" if turn == 2 else name


def judged_turns(question: Question) -> tuple[int, ...]:
    """Turn 2 is judged only for two-turn questions (FastChat skips the others)."""
    return (1, 2) if len(question.turns) == 2 else (1,)


def _reference_fields(question: Question, reference: tuple[str, ...] | None, turn: int) -> dict[str, str]:
    if not question.needs_reference:
        return {}
    if not reference or len(reference) < turn:
        raise BenchError(f"question {question.question_id!r} ({question.category}) needs a reference "
                         f"answer for turn {turn}, and there is none")
    fields = {"ref_answer_1": reference[0]}
    if turn == 2:
        fields["ref_answer_2"] = reference[1]
    return fields


def render_single(prompt: JudgePrompt, question: Question, answer: tuple[str, ...],
                  reference: tuple[str, ...] | None, turn: int) -> str:
    fields = _reference_fields(question, reference, turn)
    if turn == 2:
        return prompt.prompt_template.format(question_1=question.turns[0], question_2=question.turns[1],
                                             answer_1=answer[0], answer_2=answer[1], **fields)
    return prompt.prompt_template.format(question=question.turns[0], answer=answer[0], **fields)


def render_pair(prompt: JudgePrompt, question: Question, answer_a: tuple[str, ...], answer_b: tuple[str, ...],
                reference: tuple[str, ...] | None, turn: int) -> str:
    fields = _reference_fields(question, reference, turn)
    if turn == 2:
        return prompt.prompt_template.format(
            question_1=question.turns[0], question_2=question.turns[1], answer_a_1=answer_a[0],
            answer_b_1=answer_b[0], answer_a_2=answer_a[1], answer_b_2=answer_b[1], **fields)
    return prompt.prompt_template.format(question=question.turns[0], answer_a=answer_a[0],
                                         answer_b=answer_b[0], **fields)


def parse_rating(judgment: str) -> float | None:
    """`[[7]]`, else the first `[7]`; None when neither is there."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else None


def parse_verdict(judgment: str, output_format: str = "[[A]]") -> Verdict | None:
    """`[[A]]`, `[[B]]` or `[[C]]` (a tie), looked for in that order as FastChat does; with the
    two-rating format, the ratings compared (within 0.1 is a tie). None when unreadable."""
    if output_format == "[[rating_a,rating_b]]":
        match = TWO_SCORE.search(judgment) or TWO_SCORE_BACKUP.search(judgment)
        if not match:
            return None
        a, b = float(match.group(1)), float(match.group(2))
        return "tie" if abs(a - b) <= TIE_DELTA else ("A" if a > b else "B")
    for mark, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if mark in judgment:
            return verdict
    return None


def game_winner(verdict: Verdict, swapped: bool) -> GameWinner:
    """Game 1 shows model_1 as assistant A; game 2 (swapped) shows model_2 as A."""
    if verdict == "tie":
        return "tie"
    first = "model_2" if swapped else "model_1"
    second = "model_1" if swapped else "model_2"
    return first if verdict == "A" else second


def combine_games(g1: GameWinner, g2: GameWinner) -> Outcome:
    """A match's outcome from its two games: agreeing games decide, disagreeing ones are
    inconsistent (a tie in every table)."""
    return g1 if g1 == g2 else "inconsistent"
