"""The leaderboard's results as one data shape (`Results`), and `compute_results`, which fills
it from a battles table with the rating functions. This is what `chatfabric leaderboard` writes
as JSON, what `--follow` publishes as its snapshot and what the arena's Leaderboard tab reads.
Pure: no bus, no files; matrices hold null where a value is undefined (NaN)."""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from . import ratings
from .battles import anonymous_only as only_anonymous
from .battles import exclude_ties as without_ties
from .battles import sort_by_time
from .table import STYLE_FEATURES, Battles

RatingSystem = Literal["bt", "elo"]


class Row(BaseModel):
    """One model's line: `rating` with its 95% bootstrap interval [`lower`, `upper`]."""

    model_config = ConfigDict(frozen=True)
    model: str
    rank: int
    rating: float
    lower: float
    upper: float
    votes: int
    online_elo: float
    style_rating: float | None = None  # style-controlled Bradley-Terry, when answers' style is known


class Results(BaseModel):
    """A leaderboard. `rows` are sorted by rating, best first; `models` is the same order and
    indexes the three matrices ([i][j]: row model i against column model j)."""

    model_config = ConfigDict(frozen=True)
    rating_system: RatingSystem
    anonymous_only: bool
    exclude_ties: bool
    bootstrap_rounds: int
    seed: int
    as_of: float | None  # unix time: votes stored (stream) or cast (file) up to then; None: all
    last_seq: int | None  # the last ARENA sequence counted; None for a file
    last_vote_at: float | None = None  # when the latest vote counted was cast (unix time)
    battles: int  # battles rated, after the filters
    style_battles: int  # of those, battles whose two answers' style counts are known
    style_coefficients: dict[str, float] | None  # log-odds for model_a per std of each feature
    computed_at: float
    source: str  # "ARENA" or the file read
    rows: list[Row]
    models: list[str]
    win_fraction: list[list[float | None]]  # outright wins of i over j per battle without ties
    battle_count: list[list[int]]  # battles between i and j, either seat
    predicted_win_rate: list[list[float | None]]  # P(i beats j) from the ratings


def compute_results(
    battles: Battles, *, rating_system: RatingSystem = "bt", rounds: int = 100, seed: int = 0,
    anonymous_only: bool = True, exclude_ties: bool = False, as_of: float | None = None,
    last_seq: int | None = None, source: str = "", online_elo: dict[str, float] | None = None,
    scale: ratings.RatingScale = ratings.ELO_SCALE,
) -> Results:
    """Filter (anonymous votes, ties), order by time, and rate. `online_elo` replaces the online
    Elo computed here (a follower keeps it current vote by vote)."""
    if rounds < 1:
        raise ValueError(f"bootstrap rounds must be at least 1, got {rounds}")
    battles = rated_battles(battles, anonymous_only, exclude_ties)
    header = dict(rating_system=rating_system, anonymous_only=anonymous_only, exclude_ties=exclude_ties,
                  bootstrap_rounds=rounds, seed=seed, as_of=as_of, last_seq=last_seq, battles=len(battles),
                  last_vote_at=float(battles.tstamp.max()) if len(battles) else None,
                  source=source)
    if not len(battles):
        return Results(**header, style_battles=0, style_coefficients=None, computed_at=time.time(),
                       rows=[], models=[], win_fraction=[], battle_count=[], predicted_win_rate=[])
    elo = ratings.elo_ratings(battles, scale=scale)
    if online_elo is not None:
        elo = np.array([online_elo.get(model, scale.init) for model in battles.models])
    if rating_system == "bt":
        rating, boot = ratings.bt_ratings(battles, scale), ratings.bootstrap_bt(battles, rounds, seed, scale)
    else:
        rating, boot = elo, ratings.bootstrap_elo(battles, rounds, seed, scale=scale)
    style_battles, style, coefficients = _style(battles, scale)
    order = np.argsort(-rating, kind="stable")
    rank = ratings.ranks(boot.lower, boot.upper)
    votes = ratings.votes_per_model(battles)
    rows = [
        Row(model=battles.models[i], rank=int(rank[i]), rating=float(rating[i]), lower=float(boot.lower[i]),
            upper=float(boot.upper[i]), votes=int(votes[i]), online_elo=float(elo[i]),
            style_rating=style.get(battles.models[i]))
        for i in order
    ]
    matrix = np.ix_(order, order)
    return Results(
        **header, style_battles=style_battles, style_coefficients=coefficients, computed_at=time.time(),
        rows=rows, models=[battles.models[i] for i in order],
        win_fraction=_nullable(_win_fractions_without_ties(battles)[matrix]),
        battle_count=ratings.battle_counts(battles)[matrix].tolist(),
        predicted_win_rate=_nullable(ratings.predicted_win_rates(rating, scale)[matrix]),
    )


def rated_battles(battles: Battles, anonymous_only: bool = True, exclude_ties: bool = False) -> Battles:
    """The battles a leaderboard rates, in time order (what online Elo needs)."""
    if anonymous_only:
        battles = only_anonymous(battles)
    if exclude_ties:
        battles = without_ties(battles)
    return sort_by_time(battles)


def _win_fractions_without_ties(battles: Battles) -> np.ndarray:
    """FastChat's win-fraction matrix: on the battles without ties, in the table's model order."""
    decisive = battles.take(~battles.is_tie)
    fractions = np.full((len(battles.models), len(battles.models)), np.nan)
    index = np.array([battles.models.index(m) for m in decisive.models], dtype=np.int64)
    if len(index):
        fractions[np.ix_(index, index)] = ratings.win_fractions(decisive)
    return fractions


def _style(battles: Battles, scale) -> tuple[int, dict[str, float], dict[str, float] | None]:
    """Style-controlled ratings over the battles whose style counts are known (all of them, or
    those whose conversations were logged): (battles used, rating by model, coefficients)."""
    if battles.style_a is None:
        return 0, {}, None
    known = ~(np.isnan(battles.style_a).any(axis=1) | np.isnan(battles.style_b).any(axis=1))
    styled = battles.take(known)
    if len(styled.models) < 2:
        return int(known.sum()), {}, None
    fit = ratings.style_bt_ratings(styled, scale=scale)
    by_model = {model: float(value) for model, value in zip(styled.models, fit.ratings)}
    return len(styled), by_model, dict(zip(STYLE_FEATURES, map(float, fit.coefficients)))


def _nullable(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(value) else value for value in row] for row in matrix.tolist()]
