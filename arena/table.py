"""The battles table: one row per vote, columns as numpy arrays, models as small integers.

Models are numbered in order of first appearance in the `model_a` column, then in `model_b`
(what `pandas.factorize` does over the two columns concatenated, as FastChat numbers them).
That order fixes the order of the aggregated cells and hence what a seeded bootstrap draws."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..proto.events import WINNERS  # the votes, in the order of the `winner` codes

STYLE_FEATURES = ("length", "headers", "lists", "bold")
"""Per-answer style counts, in the column order of `style_a` / `style_b`."""

# The score of model_a for each winner code: a tie is half a win for each side.
SCORE_A = np.array([1.0, 0.0, 0.5, 0.5])


@dataclass(frozen=True, eq=False)
class Battles:
    """Battles as parallel arrays (n rows), model columns as indices into `models`.

    `style_a` / `style_b` are optional (n, 4) raw counts of each side's answer, columns as in
    STYLE_FEATURES; a NaN row means that battle carries no style information."""

    models: tuple[str, ...]
    model_a: np.ndarray  # int32
    model_b: np.ndarray  # int32
    winner: np.ndarray  # int8, index into WINNERS
    tstamp: np.ndarray  # float64, seconds
    anony: np.ndarray  # bool
    style_a: np.ndarray | None = None
    style_b: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.model_a)
        columns = (self.model_b, self.winner, self.tstamp, self.anony)
        if any(len(column) != n for column in columns):
            raise ValueError("battle columns differ in length")
        if n and min(self.model_a.min(), self.model_b.min()) < 0:
            raise ValueError("a model index is negative")
        if n and max(self.model_a.max(), self.model_b.max()) >= len(self.models):
            raise ValueError("a model index is beyond the models list")
        if n and (self.winner.min() < 0 or self.winner.max() >= len(WINNERS)):
            raise ValueError(f"a winner code is outside 0..{len(WINNERS) - 1}")
        if (self.style_a is None) != (self.style_b is None):
            raise ValueError("style_a and style_b come together")
        for style in (self.style_a, self.style_b):
            if style is not None and style.shape != (n, len(STYLE_FEATURES)):
                raise ValueError(f"style counts must have shape ({n}, {len(STYLE_FEATURES)})")

    def __len__(self) -> int:
        return len(self.model_a)

    @property
    def score_a(self) -> np.ndarray:
        """model_a's score per battle: 1 for a win, 0 for a loss, 0.5 for either tie."""
        return SCORE_A[self.winner]

    @property
    def is_tie(self) -> np.ndarray:
        return self.winner >= 2

    @classmethod
    def from_names(
        cls,
        model_a: Sequence[str],
        model_b: Sequence[str],
        winner: Sequence[str],
        tstamp: Sequence[float] | None = None,
        anony: Sequence[bool] | None = None,
        style_a: np.ndarray | None = None,
        style_b: np.ndarray | None = None,
    ) -> Battles:
        """Build the table from name columns; tstamp defaults to row order, anony to True."""
        n = len(model_a)
        codes = {name: code for code, name in enumerate(WINNERS)}
        unknown = next((w for w in winner if w not in codes), None)
        if unknown is not None:
            raise ValueError(f"winner {unknown!r} is not one of {', '.join(WINNERS)}")
        indices, models = factorize([*map(str, model_a), *map(str, model_b)])
        return cls(
            models=models,
            model_a=indices[:n],
            model_b=indices[n:],
            winner=np.array([codes[w] for w in winner], dtype=np.int8),
            tstamp=np.arange(n, dtype=np.float64) if tstamp is None else np.asarray(tstamp, float),
            anony=np.ones(n, bool) if anony is None else np.asarray(anony, bool),
            style_a=None if style_a is None else np.asarray(style_a, float),
            style_b=None if style_b is None else np.asarray(style_b, float),
        )

    def take(self, rows: np.ndarray) -> Battles:
        """The battles at `rows` (indices or a boolean mask), models renumbered as if new."""
        model_a, model_b = self.model_a[rows], self.model_b[rows]
        used = first_appearance(np.concatenate([model_a, model_b]))
        renumber = np.full(len(self.models), -1, dtype=np.int32)
        renumber[used] = np.arange(len(used), dtype=np.int32)
        return Battles(
            models=tuple(self.models[i] for i in used),
            model_a=renumber[model_a],
            model_b=renumber[model_b],
            winner=self.winner[rows],
            tstamp=self.tstamp[rows],
            anony=self.anony[rows],
            style_a=None if self.style_a is None else self.style_a[rows],
            style_b=None if self.style_b is None else self.style_b[rows],
        )


def first_appearance(values: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, in the order they first appear."""
    distinct, first = np.unique(values, return_index=True)
    return distinct[np.argsort(first, kind="stable")]


def factorize(names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes for names, numbered by first appearance, and the names in that order."""
    codes: dict[str, int] = {}
    codes_in_order = (codes.setdefault(name, len(codes)) for name in names)
    indices = np.fromiter(codes_in_order, np.int32, len(names))
    return indices, tuple(codes)
