"""Votes as they come off the stream, turned into the battles table, in bounded memory.

`VoteColumns` keeps one vote in a few bytes (model codes, winner, time, anonymity and, when
conversations are known, two 8-byte conversation keys), never the `Vote` objects: a million
votes take about 40 MB. `StyleIndex` keeps each logged conversation's four style counts under
the same 8-byte key, never its text. `OnlineElo` is online Elo one vote at a time, for a
follower that keeps it current. Pure: the bus side is `arena/feed.py`."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

import numpy as np

from .ratings import ELO_K, ELO_SCALE, RatingScale, elo_delta
from .style import style_counts
from .table import SCORE_A, WINNERS, Battles

_WINNER_CODES = {name: code for code, name in enumerate(WINNERS)}


def conversation_key(conversation_id: str) -> int:
    """A 64-bit key for a conversation id (collisions: about 1 in 10^7 among 2 million ids)."""
    return int.from_bytes(hashlib.blake2b(conversation_id.encode(), digest_size=8).digest(), "little")


@dataclass
class StyleIndex:
    """Style counts (length, headers, lists, bold) per logged conversation, by key; a later log
    of the same conversation replaces an earlier one."""

    keys: array = field(default_factory=lambda: array("Q"))
    counts: array = field(default_factory=lambda: array("d"))

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, conversation_id: str, assistant_text: str) -> None:
        self.keys.append(conversation_key(conversation_id))
        self.counts.extend(style_counts(assistant_text).tolist())

    def copy(self) -> "StyleIndex":
        return StyleIndex(array("Q", self.keys), array("d", self.counts))

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """(len(keys), 4) counts, NaN rows for conversations never logged."""
        stored = np.frombuffer(self.keys, dtype=np.uint64)
        counts = np.frombuffer(self.counts, dtype=np.float64).reshape(-1, 4)
        found = np.full((len(keys), 4), np.nan)
        if not len(stored):
            return found
        # the last log of each key wins: unique over the reversed arrays keeps last occurrences
        distinct, first_of_reversed = np.unique(stored[::-1], return_index=True)
        latest = counts[::-1][first_of_reversed]
        at = np.minimum(np.searchsorted(distinct, keys), len(distinct) - 1)
        hit = distinct[at] == keys
        found[hit] = latest[at[hit]]
        return found


@dataclass
class VoteColumns:
    """The battles table being built, one vote at a time."""

    codes: dict[str, int] = field(default_factory=dict)
    model_a: array = field(default_factory=lambda: array("i"))
    model_b: array = field(default_factory=lambda: array("i"))
    winner: array = field(default_factory=lambda: array("b"))
    tstamp: array = field(default_factory=lambda: array("d"))
    anony: array = field(default_factory=lambda: array("b"))
    conversation_a: array = field(default_factory=lambda: array("Q"))
    conversation_b: array = field(default_factory=lambda: array("Q"))

    def __len__(self) -> int:
        return len(self.winner)

    def add(self, model_a: str, model_b: str, winner: str, at: float, anonymous: bool,
            conversations: tuple[str, str] | None = None) -> None:
        """One vote; `conversations` (the two ConversationLog ids) only when style is wanted."""
        self.model_a.append(self.codes.setdefault(model_a, len(self.codes)))
        self.model_b.append(self.codes.setdefault(model_b, len(self.codes)))
        self.winner.append(_WINNER_CODES[winner])
        self.tstamp.append(at)
        self.anony.append(anonymous)
        if conversations is not None:
            self.conversation_a.append(conversation_key(conversations[0]))
            self.conversation_b.append(conversation_key(conversations[1]))

    def copy(self) -> "VoteColumns":
        """An independent copy (the arrays are copied whole: milliseconds for a million votes)."""
        return VoteColumns(dict(self.codes), *(array(column.typecode, column) for column in (
            self.model_a, self.model_b, self.winner, self.tstamp, self.anony, self.conversation_a,
            self.conversation_b)))

    def battles(self, style: StyleIndex | None = None) -> Battles:
        """A copy as a `Battles` table (models numbered as FastChat numbers them), with style
        counts from `style` when the votes were added with their conversations."""
        n = len(self)
        style_a = style_b = None
        if style is not None and len(style) and len(self.conversation_a) == n:
            style_a = style.lookup(np.frombuffer(self.conversation_a, dtype=np.uint64))
            style_b = style.lookup(np.frombuffer(self.conversation_b, dtype=np.uint64))
            if np.isnan(style_a).all():
                style_a = style_b = None
        table = Battles(
            models=tuple(self.codes),
            model_a=np.array(self.model_a, dtype=np.int32),
            model_b=np.array(self.model_b, dtype=np.int32),
            winner=np.array(self.winner, dtype=np.int8),
            tstamp=np.array(self.tstamp, dtype=np.float64),
            anony=np.array(self.anony, dtype=bool),
            style_a=style_a,
            style_b=style_b,
        )
        return table.take(np.arange(n))  # renumbers models by first appearance in a, then b


@dataclass
class OnlineElo:
    """Online Elo kept vote by vote (`ratings.elo_ratings`'s update, K = 4): a model's first
    vote starts it at `scale.init`."""

    k: float = ELO_K
    scale: RatingScale = ELO_SCALE
    ratings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_table(cls, battles: Battles, elo: np.ndarray, **kwargs) -> "OnlineElo":
        return cls(ratings=dict(zip(battles.models, map(float, elo))), **kwargs)

    def update(self, model_a: str, model_b: str, winner: str) -> None:
        rating_a = self.ratings.setdefault(model_a, self.scale.init)
        rating_b = self.ratings.setdefault(model_b, self.scale.init)
        delta = elo_delta(rating_a, rating_b, float(SCORE_A[_WINNER_CODES[winner]]), self.k, self.scale)
        self.ratings[model_a] = rating_a + delta
        self.ratings[model_b] = rating_b - delta
