"""Tables from judgments, as pure functions: FastChat's `show_result.py` numbers plus what it
leaves out (failures counted, per-category scores, bootstrap confidence intervals).

Judgment records are FastChat's `model_judgment/*.jsonl` rows (`judge run` writes the same shape,
with `category` and `failure` added), so an existing FastChat file is summarised the same way.
Single grading: a model's turn 1, turn 2 and overall means exclude failed judgments (FastChat's
score -1, our null) and say how many failed. Pairwise: a match whose two games agree has a
winner; a tie or two disagreeing games (inconsistent) is a tie; a match with a failed game is
left out and counted as failed; adjusted win rate = (win + 0.5 tie) / (win + loss + tie).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .scoring import combine_games

BOOTSTRAP_ROUNDS = 1000
CI_LEVEL = 0.95


@dataclass(frozen=True)
class SingleRow:
    question_id: object
    model: str
    turn: int
    score: float | None  # None: the judgment failed
    category: str | None = None


@dataclass(frozen=True)
class PairRow:
    question_id: object
    model_1: str
    model_2: str
    turn: int
    g1: str  # model_1, model_2, tie, or error
    g2: str
    category: str | None = None

    @property
    def failed(self) -> bool:
        return "error" in (self.g1, self.g2)

    def points(self, model: str) -> float:
        """1 for a win of `model`, 0 for a loss, 0.5 for a tie or an inconsistent match."""
        outcome = combine_games(self.g1, self.g2)
        if outcome in ("tie", "inconsistent"):
            return 0.5
        return 1.0 if (outcome == "model_1") == (model == self.model_1) else 0.0


class JudgmentFileError(ValueError):
    """A judgment file that is neither FastChat's single nor its pairwise shape."""


def read_judgment_files(paths: Iterable[Path], categories: dict | None = None) -> list[dict]:
    records = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JudgmentFileError(f"{path}:{number}: not JSON: {err.msg}") from None
            if not isinstance(record, dict) or "question_id" not in record:
                raise JudgmentFileError(f"{path}:{number}: not a judgment (no question_id)")
            if categories is not None and record.get("category") is None:
                record["category"] = categories.get(record["question_id"])
            records.append(record)
    return records


def single_rows(records: Iterable[dict]) -> list[SingleRow]:
    rows = []
    for r in records:
        if "model" not in r or "score" not in r:
            continue
        score = r["score"]
        failed = score is None or score == -1 or r.get("failure")
        rows.append(SingleRow(r["question_id"], r["model"], int(r.get("turn", 1)),
                              None if failed else float(score), r.get("category")))
    return rows


def pair_rows(records: Iterable[dict]) -> list[PairRow]:
    rows = []
    for r in records:
        if "model_1" not in r:
            continue
        if "winner" in r:  # FastChat's human-judgment shape: one verdict
            g1 = g2 = r["winner"]
        else:
            g1, g2 = r["g1_winner"], r["g2_winner"]
        rows.append(PairRow(r["question_id"], r["model_1"], r["model_2"], int(r.get("turn", 1)),
                            g1, g2, r.get("category")))
    return rows


def confidence_interval(values: list[float], rng: np.random.Generator,
                        rounds: int = BOOTSTRAP_ROUNDS) -> tuple[float, float] | None:
    """Percentile bootstrap of the mean; None with nothing to resample."""
    if not values:
        return None
    data = np.asarray(values, dtype=float)
    means = data[rng.integers(0, len(data), size=(rounds, len(data)))].mean(axis=1)
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _stats(scores: list[float | None], rng, rounds) -> dict:
    good = [s for s in scores if s is not None]
    return {"mean": float(np.mean(good)) if good else None, "ci": confidence_interval(good, rng, rounds),
            "n": len(good), "failed": len(scores) - len(good)}


def summarize_single(rows: list[SingleRow], seed: int = 0, rounds: int = BOOTSTRAP_ROUNDS) -> dict:
    rng = np.random.default_rng(seed)
    models = []
    for model in sorted({r.model for r in rows}):
        mine = [r for r in rows if r.model == model]
        entry = {"model": model}
        for label, turn in (("turn_1", 1), ("turn_2", 2)):
            entry[label] = _stats([r.score for r in mine if r.turn == turn], rng, rounds)
        entry["overall"] = _stats([r.score for r in mine], rng, rounds)
        entry["categories"] = _category_means({r.category: [] for r in mine if r.category},
                                              ((r.category, r.score) for r in mine))
        models.append(entry)
    models.sort(key=lambda e: -1 if e["overall"]["mean"] is None else e["overall"]["mean"], reverse=True)
    return {"mode": "single", "models": models}


def _category_means(buckets: dict, pairs) -> dict[str, float | None]:
    for category, value in pairs:
        if category and value is not None:
            buckets[category].append(value)
    return {c: (float(np.mean(v)) if v else None) for c, v in sorted(buckets.items())}


def summarize_pairwise(rows: list[PairRow], baseline: str | None = None, seed: int = 0,
                       rounds: int = BOOTSTRAP_ROUNDS) -> dict:
    """FastChat's pairwise-baseline (only matches against `baseline`, which is not listed) or
    pairwise-all (`baseline` None: every match of every model)."""
    rng = np.random.default_rng(seed)
    if baseline is not None:
        rows = [r for r in rows if baseline in (r.model_1, r.model_2)]
    names = sorted({m for r in rows for m in (r.model_1, r.model_2)} - {baseline})
    models = [_pair_entry(model, [r for r in rows if model in (r.model_1, r.model_2)], rng, rounds)
              for model in names]
    models.sort(key=lambda e: -1 if e["win_rate_adjusted"] is None else e["win_rate_adjusted"], reverse=True)
    return {"mode": "pairwise-baseline" if baseline else "pairwise-all", "baseline": baseline, "models": models}


def _pair_entry(model: str, rows: list[PairRow], rng, rounds) -> dict:
    played = [r for r in rows if not r.failed]
    points = [r.points(model) for r in played]
    win, loss = points.count(1.0), points.count(0.0)
    tie = len(points) - win - loss
    total = len(points)
    rate = (lambda k: k / total) if total else (lambda k: None)
    return {
        "model": model, "win": win, "loss": loss, "tie": tie,
        "inconsistent": sum(combine_games(r.g1, r.g2) == "inconsistent" for r in played),
        "failed": len(rows) - total, "total": total,
        "win_rate": rate(win), "loss_rate": rate(loss), "win_rate_adjusted": rate(win + 0.5 * tie),
        "ci": confidence_interval(points, rng, rounds),
        "categories": _category_means({r.category: [] for r in played if r.category},
                                      ((r.category, r.points(model)) for r in played)),
    }


def summarize(records: list[dict], mode: str, baseline: str | None = None, seed: int = 0) -> dict:
    if mode == "single":
        rows = single_rows(records)
        if not rows and records:
            raise JudgmentFileError("no single-grading judgments (rows with model and score) in the input")
        return summarize_single(rows, seed)
    rows = pair_rows(records)
    if not rows and records:
        raise JudgmentFileError("no pairwise judgments (rows with model_1, model_2, g1_winner, g2_winner)")
    return summarize_pairwise(rows, baseline if mode == "pairwise-baseline" else None, seed)


# -- text tables ----------------------------------------------------------------------------------


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_summary(summary: dict) -> str:
    if summary["mode"] == "single":
        return _format_single(summary)
    return _format_pairwise(summary)


def _format_single(summary: dict) -> str:
    rows = [[e["model"], _num(e["turn_1"]["mean"]), _num(e["turn_2"]["mean"]), _num(e["overall"]["mean"]),
             _ci(e["overall"]["ci"]), str(e["overall"]["n"]), str(e["overall"]["failed"])]
            for e in summary["models"]]
    out = ["Mode: single", text_table(["model", "turn 1", "turn 2", "overall", "95% CI", "judged", "failed"], rows)]
    out += _category_table(summary, "mean score")
    return "\n".join(out)


def _format_pairwise(summary: dict) -> str:
    rows = [[e["model"], str(e["win"]), str(e["loss"]), str(e["tie"]), str(e["inconsistent"]), str(e["failed"]),
             _num(e["win_rate"], 3), _num(e["loss_rate"], 3), _num(e["win_rate_adjusted"], 3), _ci(e["ci"])]
            for e in summary["models"]]
    title = f"Mode: {summary['mode']}" + (f" (baseline {summary['baseline']})" if summary.get("baseline") else "")
    headers = ["model", "win", "loss", "tie", "(inconsistent)", "failed", "win_rate", "loss_rate",
               "win_rate_adjusted", "95% CI"]
    return "\n".join([title, text_table(headers, rows), *_category_table(summary, "adjusted win rate")])


def _category_table(summary: dict, what: str) -> list[str]:
    categories = sorted({c for e in summary["models"] for c in e["categories"]})
    if not categories:
        return []
    rows = [[e["model"], *(_num(e["categories"].get(c)) for c in categories)] for e in summary["models"]]
    return ["", f"Per category ({what})", text_table(["model", *categories], rows)]
