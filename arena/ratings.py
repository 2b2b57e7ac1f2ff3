"""Leaderboard ratings as small pure functions over a battles table: online Elo, Bradley-Terry
maximum likelihood, bootstrap confidence intervals, ranks, pairwise matrices and style control.

Conventions are FastChat's arena (fastchat/serve/monitor/rating_systems.py): a rating is
init + scale * s for a strength s in log-base units, so base**((r_i - r_j) / scale) are the odds
of i beating j; a tie is half a win and half a loss. Nothing here does I/O; the fits are
synchronous and take seconds on a million battles, so an async caller runs them off the loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from .table import Battles

ELO_K = 4.0
STYLE_REG = 0.5  # FastChat's L2 weight on every style-control parameter, ratings included
_ELO_CHUNK = 8192  # resampled steps drawn at a time: bounds memory to rounds * chunk indices


@dataclass(frozen=True)
class RatingScale:
    """How strengths become ratings: init + scale * s, and optionally one model pinned to a
    rating (FastChat pins mixtral-8x7b-instruct-v0.1 at 1114 when present: see FASTCHAT)."""

    scale: float = 400.0
    base: float = 10.0
    init: float = 1000.0
    anchor: tuple[str, float] | None = None

    @property
    def log_base(self) -> float:
        return math.log(self.base)

    def ratings(self, strengths: np.ndarray, models: tuple[str, ...]) -> np.ndarray:
        """Strengths (..., models) as ratings."""
        ratings = self.init + self.scale * strengths
        if self.anchor is not None and self.anchor[0] in models:
            index = models.index(self.anchor[0])
            ratings = ratings + (self.anchor[1] - ratings[..., index:index + 1])
        return ratings


ELO_SCALE = RatingScale()
FASTCHAT = RatingScale(anchor=("mixtral-8x7b-instruct-v0.1", 1114.0))


# ---------------------------------------------------------------- online Elo


def elo_delta(rating_a, rating_b, score_a, k: float, scale: RatingScale, exp=math.exp):
    """Online Elo's step for one battle: k * (score_a - expected_a); model_a moves by it and
    model_b by its opposite. On arrays (several resamples at once) with `exp=np.exp`."""
    return k * (score_a - 1.0 / (1.0 + exp(scale.log_base / scale.scale * (rating_b - rating_a))))


def elo_ratings(battles: Battles, k: float = ELO_K, scale: RatingScale = ELO_SCALE) -> np.ndarray:
    """Online Elo in table order (sort by time first), everyone starting at scale.init: each
    battle moves model_a by k * (score_a - expected_a) and model_b by the opposite, so the
    total is kept. No anchor applies (FastChat anchors only the Bradley-Terry fits)."""
    ratings = [scale.init] * len(battles.models)
    rows = zip(battles.model_a.tolist(), battles.model_b.tolist(), battles.score_a.tolist())
    for a, b, score in rows:
        delta = elo_delta(ratings[a], ratings[b], score, k, scale)
        ratings[a] += delta
        ratings[b] -= delta
    return np.array(ratings)


def elo_on_resamples(
    battles: Battles, rows: np.ndarray, k: float = ELO_K, scale: RatingScale = ELO_SCALE
) -> np.ndarray:
    """Online Elo on several resamples at once: column j of `rows` (steps, rounds) lists the
    battles of round j in play order. Returns ratings[round, model]."""
    ratings = np.zeros((rows.shape[1], len(battles.models)))
    for start in range(0, len(rows), _ELO_CHUNK):
        _replay_elo(ratings, battles, rows[start:start + _ELO_CHUNK], k, scale)
    return ratings + scale.init


def _replay_elo(ratings: np.ndarray, battles: Battles, rows: np.ndarray, k, scale) -> None:
    rounds = np.arange(rows.shape[1])
    model_a, model_b, score = battles.model_a[rows], battles.model_b[rows], battles.score_a[rows]
    for a, b, s in zip(model_a, model_b, score):
        delta = elo_delta(ratings[rounds, a], ratings[rounds, b], s, k, scale, exp=np.exp)
        ratings[rounds, a] += delta
        ratings[rounds, b] -= delta


# ---------------------------------------------------------------- Bradley-Terry


@dataclass(frozen=True)
class OutcomeCells:
    """Battles aggregated into distinct (model_a, model_b, outcome) cells with their counts,
    sorted by model_a, model_b, then outcome (b wins, tie, a wins), as FastChat sorts them."""

    model_a: np.ndarray
    model_b: np.ndarray
    score_a: np.ndarray
    count: np.ndarray


def outcome_cells(battles: Battles) -> OutcomeCells:
    n_models = len(battles.models)
    outcome = (2 * battles.score_a).astype(np.int64)  # 0, 1, 2
    keys = (battles.model_a.astype(np.int64) * n_models + battles.model_b) * 3 + outcome
    keys, count = np.unique(keys, return_counts=True)
    pair, outcome = np.divmod(keys, 3)
    model_a, model_b = np.divmod(pair, n_models)
    return OutcomeCells(model_a, model_b, outcome / 2.0, count.astype(np.float64))


def win_matrix(cells: OutcomeCells, n_models: int, count: np.ndarray | None = None) -> np.ndarray:
    """wins[i, j]: (weighted) wins of i over j, each tie counting half to both."""
    count = cells.count if count is None else count
    size = n_models * n_models
    wins = np.bincount(cells.model_a * n_models + cells.model_b, count * cells.score_a, size)
    wins += np.bincount(cells.model_b * n_models + cells.model_a, count * (1 - cells.score_a), size)
    return wins.reshape(n_models, n_models)


def pairwise_wins(battles: Battles) -> np.ndarray:
    return win_matrix(outcome_cells(battles), len(battles.models))


def fit_bradley_terry(wins: np.ndarray, log_base: float = math.log(10.0)) -> np.ndarray:
    """Maximum-likelihood strengths, mean zero, for P(i beats j) = expit(log_base * (s_i - s_j)),
    from a (models x models) win matrix. Newton trust-region steps (scipy's trust-ncg) with the
    exact Hessian: no BLAS threads, which on a busy 2-core machine made L-BFGS-B 15x slower.

    A model with only wins (or only losses) has no finite estimate; the fit stops where the
    gradient vanishes numerically, thousands of rating points away from the others."""
    if not wins.any():
        return np.zeros(len(wins))
    wins = wins / wins.sum()
    games = wins + wins.T

    def loss_and_grad(strength):
        margin = log_base * (strength[:, np.newaxis] - strength[np.newaxis, :])
        pull = wins * expit(-margin)  # -d(loss)/d(margin) for each ordered pair
        loss = (wins * np.logaddexp(0.0, -margin)).sum()
        return loss, log_base * (pull.sum(axis=0) - pull.sum(axis=1))

    def hessian(strength):
        p = expit(log_base * (strength[:, np.newaxis] - strength[np.newaxis, :]))
        h = -log_base**2 * games * p * (1.0 - p)
        np.fill_diagonal(h, 0.0)
        np.fill_diagonal(h, -h.sum(axis=1))
        return h

    result = minimize(
        loss_and_grad, np.zeros(len(wins)), jac=True, hess=hessian, method="trust-ncg",
        options={"gtol": 1e-10, "maxiter": 1000},
    )
    return result.x - result.x.mean()


def bt_ratings(battles: Battles, scale: RatingScale = ELO_SCALE) -> np.ndarray:
    """Bradley-Terry ratings (FastChat's `compute_bt`): mean scale.init unless anchored."""
    return scale.ratings(fit_bradley_terry(pairwise_wins(battles), scale.log_base), battles.models)


# ---------------------------------------------------------------- bootstrap and rank


@dataclass(frozen=True)
class Bootstrap:
    """Ratings refitted on resampled battles: samples[round, model]."""

    models: tuple[str, ...]
    samples: np.ndarray

    def quantile(self, q: float) -> np.ndarray:
        return np.quantile(self.samples, q, axis=0)

    @property
    def median(self) -> np.ndarray:
        return self.quantile(0.5)

    @property
    def lower(self) -> np.ndarray:
        """The 2.5% quantile: the lower end of the 95% interval."""
        return self.quantile(0.025)

    @property
    def upper(self) -> np.ndarray:
        return self.quantile(0.975)


def bootstrap_bt(
    battles: Battles, rounds: int = 100, seed: int = 0, scale: RatingScale = ELO_SCALE
) -> Bootstrap:
    """Bradley-Terry on `rounds` resamples of the battles, drawn with replacement as multinomial
    counts over the outcome cells (FastChat's `compute_bootstrap_bt`, whose seed is 0)."""
    cells, n_models = outcome_cells(battles), len(battles.models)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(battles), cells.count / cells.count.sum(), size=rounds)
    strengths = [fit_bradley_terry(win_matrix(cells, n_models, c), scale.log_base) for c in counts]
    return Bootstrap(battles.models, scale.ratings(np.array(strengths), battles.models))


def bootstrap_elo(
    battles: Battles, rounds: int = 100, seed: int = 0, k: float = ELO_K,
    scale: RatingScale = ELO_SCALE,
) -> Bootstrap:
    """Online Elo on `rounds` resamples, each n battles drawn with replacement in random order."""
    rng, n = np.random.default_rng(seed), len(battles)
    ratings = np.zeros((rounds, len(battles.models)))
    for start in range(0, n, _ELO_CHUNK):
        rows = rng.integers(0, n, size=(min(_ELO_CHUNK, n - start), rounds))
        _replay_elo(ratings, battles, rows, k, scale)
    return Bootstrap(battles.models, ratings + scale.init)


def ranks(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """1 + the number of models whose interval lies wholly above this model's upper bound."""
    return 1 + (lower[np.newaxis, :] > upper[:, np.newaxis]).sum(axis=1)


# ---------------------------------------------------------------- counts and matrices


def votes_per_model(battles: Battles) -> np.ndarray:
    n_models = len(battles.models)
    seats = np.concatenate([battles.model_a, battles.model_b])
    return np.bincount(seats, minlength=n_models)


def battle_counts(battles: Battles) -> np.ndarray:
    """counts[i, j]: battles between i and j, in either seat (symmetric)."""
    n_models = len(battles.models)
    seated = np.bincount(battles.model_a * n_models + battles.model_b, minlength=n_models**2)
    seated = seated.reshape(n_models, n_models)
    return seated + seated.T


def win_fractions(battles: Battles) -> np.ndarray:
    """fractions[i, j]: i's outright wins over j per battle between them (NaN if none). Ties
    count in the denominator only; FastChat draws this matrix on the battles without ties."""
    n_models = len(battles.models)
    a_won, decisive = battles.winner == 0, battles.winner < 2
    winner = np.where(a_won, battles.model_a, battles.model_b)[decisive]
    loser = np.where(a_won, battles.model_b, battles.model_a)[decisive]
    wins = np.bincount(winner * n_models + loser, minlength=n_models**2)
    counts = battle_counts(battles)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, wins.reshape(n_models, n_models) / counts, np.nan)


def predicted_win_rates(ratings: np.ndarray, scale: RatingScale = ELO_SCALE) -> np.ndarray:
    """rates[i, j] = 1 / (1 + base**((r_j - r_i) / scale)): i's expected score against j."""
    alpha = scale.log_base / scale.scale
    return expit(alpha * (ratings[:, np.newaxis] - ratings[np.newaxis, :]))


# ---------------------------------------------------------------- style control


def style_differences(counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b + 1) per style count: a bounded, relative difference."""
    counts_a, counts_b = np.asarray(counts_a, float), np.asarray(counts_b, float)
    return (counts_a - counts_b) / (counts_a + counts_b + 1.0)


def standardize(columns: np.ndarray) -> np.ndarray:
    """Each column to mean 0 and (population) standard deviation 1; constant columns to 0."""
    std = columns.std(axis=0)
    centred = columns - columns.mean(axis=0)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def style_features(battles: Battles) -> np.ndarray:
    """The (battles, 4) style design: standardized style differences, model_a minus model_b."""
    if battles.style_a is None:
        raise ValueError("these battles carry no style counts (conv_metadata or conversations)")
    missing = np.isnan(battles.style_a).any(axis=1) | np.isnan(battles.style_b).any(axis=1)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} of {len(battles)} battles have no style counts")
    return standardize(style_differences(battles.style_a, battles.style_b))


@dataclass(frozen=True)
class StyleFit:
    """Style-controlled ratings and the style coefficients: the log-odds of model_a winning
    per standard deviation of each feature, in STYLE_FEATURES order."""

    models: tuple[str, ...]
    ratings: np.ndarray
    coefficients: np.ndarray


def fit_style_bradley_terry(
    battles: Battles, features: np.ndarray, reg: float = STYLE_REG, log_base: float = math.log(10.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Per-battle logistic fit of P(a wins) = expit(log_base * (s_a - s_b) + features @ beta),
    ties as half a win, with an L2 penalty reg/2 * |(s, beta)|^2. Returns (strengths, beta);
    strengths have mean zero."""
    n_models, a, b, score = len(battles.models), battles.model_a, battles.model_b, battles.score_a
    total = len(battles)

    def loss_and_grad(params):
        strength, beta = params[:n_models], params[n_models:]
        logit = log_base * (strength[a] - strength[b]) + features @ beta
        nll = (np.logaddexp(0.0, logit) - score * logit).sum()
        error = expit(logit) - score
        grad = reg * params
        per_model = np.bincount(a, error, n_models) - np.bincount(b, error, n_models)
        grad[:n_models] += log_base * per_model
        grad[n_models:] += features.T @ error
        return (nll + 0.5 * reg * params @ params) / total, grad / total

    # Per-battle losses (order 1): these tolerances stop within ~1e-8 of the optimum.
    result = minimize(
        loss_and_grad, np.zeros(n_models + features.shape[1]), jac=True, method="L-BFGS-B",
        options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15},
    )
    strength = result.x[:n_models]
    return strength - strength.mean(), result.x[n_models:]


def style_bt_ratings(
    battles: Battles, reg: float = STYLE_REG, scale: RatingScale = ELO_SCALE
) -> StyleFit:
    """Style-controlled Bradley-Terry (FastChat's `compute_style_control`)."""
    features = style_features(battles)
    strength, beta = fit_style_bradley_terry(battles, features, reg=reg, log_base=scale.log_base)
    return StyleFit(battles.models, scale.ratings(strength, battles.models), beta)
