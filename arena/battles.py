"""Reading FastChat's clean-battle files into the battles table, and the usual filters.

A file is either JSON Lines (one battle object per line) or one JSON array of battle objects
(what `clean_battle_data.py` writes). Each battle has `model_a`, `model_b`, `winner` (one of
WINNERS), `tstamp` (seconds) and `anony` (bool). Style counts come from `conv_metadata` when
present (FastChat's `sum_assistant_a_tokens`, `header_count_a`, `list_count_a`, `bold_count_a`
and the `_b` fields; a dict counts as the sum of its values), otherwise from `conversation_a`
/ `conversation_b` text (length in characters). Errors name the file and the line."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..proto.files import RecordError, json_records
from .style import assistant_text, style_counts
from .table import WINNERS, Battles, factorize

# conv_metadata fields per side, in STYLE_FEATURES order (length, headers, lists, bold).
_METADATA_NAMES = ("sum_assistant_{}_tokens", "header_count_{}", "list_count_{}", "bold_count_{}")
_METADATA_FIELDS = {side: [name.format(side) for name in _METADATA_NAMES] for side in "ab"}
_NO_STYLE = [math.nan] * 4


class BattleFormatError(ValueError):
    """A battle file that cannot be read, with the line where the problem starts."""


def read_battles(path: str | Path) -> Battles:
    """All battles of a clean-battle file, in file order (see `sort_by_time`)."""
    columns = _Columns()
    for line, record in read_records(path):
        try:
            columns.append(record)
        except (KeyError, TypeError, ValueError) as error:
            raise BattleFormatError(f"{path}:{line}: {_describe(error)}") from None
    return columns.table()


def read_records(path: str | Path):
    """(line, parsed JSON value) for each battle of a JSON array or JSON Lines file, unchecked."""
    try:
        yield from json_records(path)
    except RecordError as err:
        raise BattleFormatError(str(err)) from None


def check_battle(record) -> None:
    """Raise KeyError, TypeError or ValueError saying what makes `record` not a battle."""
    _Columns().append(record)


def describe(error: Exception) -> str:
    """A record error in words: what `read_battles` puts after `file:line: `."""
    return _describe(error)


@dataclass
class _Columns:
    """The table's columns while a file is read; style rows are 4 counts each, NaN if absent."""

    model_a: list[str] = field(default_factory=list)
    model_b: list[str] = field(default_factory=list)
    winner: list[int] = field(default_factory=list)
    tstamp: list[float] = field(default_factory=list)
    anony: list[bool] = field(default_factory=list)
    style_a: list[float] = field(default_factory=list)
    style_b: list[float] = field(default_factory=list)

    def append(self, record: dict) -> None:
        if not isinstance(record, dict):
            raise TypeError("a battle must be a JSON object")
        model_a, model_b = _model_name(record, "model_a"), _model_name(record, "model_b")
        if model_a == model_b:
            raise ValueError(f"model_a and model_b are the same model ({model_a!r})")
        if record["winner"] not in WINNERS:
            raise ValueError(f"winner {record['winner']!r} is not one of {', '.join(WINNERS)}")
        tstamp, anony = record["tstamp"], record["anony"]
        if isinstance(tstamp, bool) or not isinstance(tstamp, (int, float)):
            raise TypeError(f"tstamp must be a number of seconds, not {tstamp!r}")
        if not isinstance(anony, bool):
            raise TypeError(f"anony must be true or false, not {anony!r}")
        style_a, style_b = _style(record)
        self.model_a.append(model_a)
        self.model_b.append(model_b)
        self.winner.append(WINNERS.index(record["winner"]))
        self.tstamp.append(tstamp)
        self.anony.append(anony)
        self.style_a.extend(style_a)
        self.style_b.extend(style_b)

    def table(self) -> Battles:
        n = len(self.model_a)
        indices, models = factorize([*self.model_a, *self.model_b])
        style_a = np.array(self.style_a, dtype=np.float64).reshape(n, 4)
        style_b = np.array(self.style_b, dtype=np.float64).reshape(n, 4)
        has_style = not np.isnan(style_a).all()
        return Battles(
            models=models,
            model_a=indices[:n],
            model_b=indices[n:],
            winner=np.array(self.winner, dtype=np.int8),
            tstamp=np.array(self.tstamp, dtype=np.float64),
            anony=np.array(self.anony, dtype=bool),
            style_a=style_a if has_style else None,
            style_b=style_b if has_style else None,
        )


def _model_name(record: dict, field: str) -> str:
    name = record[field]
    if not isinstance(name, str) or not name:
        raise TypeError(f"{field} must be a non-empty string, not {name!r}")
    return name


def _style(record: dict) -> tuple[list[float], list[float]]:
    if "conv_metadata" in record:
        metadata = record["conv_metadata"]
        if not isinstance(metadata, dict):
            raise TypeError(f"conv_metadata must be an object, not {metadata!r}")
        return [[_metadata_count(metadata, name) for name in _METADATA_FIELDS[side]] for side in "ab"]
    if "conversation_a" in record and "conversation_b" in record:
        return [list(style_counts(_conversation_text(record, f"conversation_{side}"))) for side in "ab"]
    return _NO_STYLE, _NO_STYLE


def _metadata_count(metadata: dict, field: str) -> float:
    value = metadata[field]
    if type(value) is dict and all(type(count) in (int, float) for count in value.values()):
        value = sum(value.values())
    if type(value) not in (int, float):
        raise TypeError(f"conv_metadata.{field} must be a count or a dict of counts, not {value!r}")
    return value


def _conversation_text(record: dict, field: str) -> str:
    conversation = record[field]
    if not isinstance(conversation, list) or not all(map(_is_text_turn, conversation)):
        raise TypeError(f"{field} must be a list of {{role, content}} turns with text content")
    return assistant_text(conversation)


def _is_text_turn(turn) -> bool:
    return isinstance(turn, dict) and "role" in turn and isinstance(turn.get("content"), str)


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error.args[0]!r}"
    return str(error)


# ---------------------------------------------------------------- filters


def sort_by_time(battles: Battles) -> Battles:
    """Battles in time order (stable: equal timestamps keep file order), as online Elo needs."""
    return battles.take(np.argsort(battles.tstamp, kind="stable"))


def anonymous_only(battles: Battles) -> Battles:
    """Only the battles voted with the model names hidden (FastChat's leaderboard uses these)."""
    return battles.take(battles.anony)


def exclude_ties(battles: Battles) -> Battles:
    return battles.take(~battles.is_tie)
