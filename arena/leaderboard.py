"""One leaderboard from a battles table: FastChat's published columns (Bradley-Terry rating,
95% bootstrap interval, rank, votes), online Elo, and the style-controlled rating beside them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ratings
from .battles import anonymous_only, sort_by_time
from .table import Battles


@dataclass(frozen=True)
class Leaderboard:
    """Columns per model, rows sorted by rating (best first)."""

    models: tuple[str, ...]
    rating: np.ndarray  # Bradley-Terry point estimate
    lower: np.ndarray  # 2.5% bootstrap quantile
    upper: np.ndarray  # 97.5% bootstrap quantile
    rank: np.ndarray
    votes: np.ndarray
    online_elo: np.ndarray
    style_rating: np.ndarray | None  # style-controlled Bradley-Terry, when battles carry style


def leaderboard(
    battles: Battles, rounds: int = 100, seed: int = 0,
    scale: ratings.RatingScale = ratings.ELO_SCALE, anonymous: bool = True,
) -> Leaderboard:
    """The leaderboard as FastChat publishes it: anonymous votes in time order by default."""
    battles = sort_by_time(anonymous_only(battles) if anonymous else battles)
    rating = ratings.bt_ratings(battles, scale)
    boot = ratings.bootstrap_bt(battles, rounds, seed, scale)
    style = None if battles.style_a is None else ratings.style_bt_ratings(battles, scale=scale).ratings
    order = np.argsort(-rating, kind="stable")
    return Leaderboard(
        models=tuple(battles.models[i] for i in order),
        rating=rating[order],
        lower=boot.lower[order],
        upper=boot.upper[order],
        rank=ratings.ranks(boot.lower, boot.upper)[order],
        votes=ratings.votes_per_model(battles)[order],
        online_elo=ratings.elo_ratings(battles, scale=scale)[order],
        style_rating=None if style is None else style[order],
    )
