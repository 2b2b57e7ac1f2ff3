"""How often the judge agrees with people: FastChat's `compute_agreement.py` (judge against
human), with the human votes read from the arena's `ARENA` stream.

A vote counts when the conversation it judged asked a bench question: its first user message is
the question's first turn, and its number of user messages is the turn judged. Model pairs are
put in name order (the winner flipped with them), each judge verdict is compared with every
human vote on the same question, turn and pair; "without ties" leaves out every pair of votes
where either side is a tie.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from .bench import Question
from .results import PairRow
from .scoring import combine_games

Key = tuple[object, int, str, str]  # question id, turn, model_a, model_b (a < b)


def _flip(winner: str) -> str:
    return {"model_a": "model_b", "model_b": "model_a"}.get(winner, winner)


def _key(question_id, turn: int, model_a: str, model_b: str, winner: str) -> tuple[Key, str]:
    if model_a < model_b:
        return (question_id, turn, model_a, model_b), winner
    return (question_id, turn, model_b, model_a), _flip(winner)


def judge_verdicts(rows: Iterable[PairRow]) -> dict[Key, str]:
    """One verdict per match (model_a/model_b/tie); inconsistent games are a tie, failed
    matches have none."""
    verdicts = {}
    for r in rows:
        if r.failed:
            continue
        outcome = combine_games(r.g1, r.g2)
        winner = {"model_1": "model_a", "model_2": "model_b"}.get(outcome, "tie")
        key, winner = _key(r.question_id, r.turn, r.model_1, r.model_2, winner)
        verdicts[key] = winner
    return verdicts


def human_verdicts(votes: Iterable[tuple[object, int, str, str, str]]) -> dict[Key, list[str]]:
    """(question id, turn, model_a, model_b, winner) votes, grouped by normalised key."""
    grouped: dict[Key, list[str]] = defaultdict(list)
    for qid, turn, a, b, winner in votes:
        key, winner = _key(qid, turn, a, b, winner)
        grouped[key].append(winner)
    return dict(grouped)


def _tie(vote: str) -> bool:
    return "tie" in vote


def agreement(judge: dict[Key, str], human: dict[Key, list[str]], turn: int, with_ties: bool) -> tuple[int, int]:
    """(agreeing, compared) for one turn, as FastChat's `get_mt_bench_agreement`."""
    agree = total = 0
    for key, verdict in judge.items():
        if key[1] != turn or key not in human or (not with_ties and _tie(verdict)):
            continue
        for vote in human[key]:
            if not with_ties and _tie(vote):
                continue
            total += 1
            agree += (_tie(verdict) and _tie(vote)) or verdict == vote
    return agree, total


def match_question(first_user_message: str, user_turns: int, questions: Iterable[Question]) -> tuple[object, int] | None:
    """(question id, turn) of a conversation that asked a bench question, else None."""
    for q in questions:
        if q.turns[0].strip() == first_user_message.strip() and 1 <= user_turns <= len(q.turns):
            return q.question_id, user_turns
    return None


def agreement_table(judge: dict[Key, str], human: dict[Key, list[str]]) -> list[dict]:
    rows = []
    for turn in (1, 2):
        for with_ties in (True, False):
            agree, total = agreement(judge, human, turn, with_ties)
            rows.append({"turn": turn, "ties": "with" if with_ties else "without", "total": total,
                         "agree": agree, "ratio": agree / total if total else None})
    return rows
