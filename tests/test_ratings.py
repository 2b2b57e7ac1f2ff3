"""The arena's rating math against hand-computed values and its invariants: online Elo,
Bradley-Terry, bootstrap intervals, ranks, matrices, style control, and the battle reader."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatfabric.arena import ratings
from chatfabric.arena.battles import (
    BattleFormatError,
    anonymous_only,
    exclude_ties,
    read_battles,
    sort_by_time,
)
from chatfabric.arena.leaderboard import leaderboard
from chatfabric.arena.style import pair_style, style_counts
from chatfabric.arena.table import WINNERS, Battles

bounded = settings(max_examples=40, deadline=None)


def battles(*rows: tuple[str, str, str]) -> Battles:
    model_a, model_b, winner = zip(*rows)
    return Battles.from_names(model_a, model_b, winner)


def mirrored(table: Battles) -> Battles:
    """Every battle with the seats swapped and the vote swapped with them."""
    swap = np.array([1, 0, 2, 3], dtype=np.int8)
    return replace(table, model_a=table.model_b, model_b=table.model_a, winner=swap[table.winner])


@st.composite
def battle_tables(draw, max_models: int = 5, max_battles: int = 60) -> Battles:
    """Random battles, led by a chain of ties m0-m1, m1-m2, ... so every model has a finite
    Bradley-Terry rating (each has half a win and half a loss in a connected graph)."""
    n_models = draw(st.integers(2, max_models))
    pairs = st.tuples(st.integers(0, n_models - 1), st.integers(1, n_models - 1))
    drawn = draw(st.lists(st.tuples(pairs, st.integers(0, 3)), min_size=1, max_size=max_battles))
    rows = [((i, 1), 2) for i in range(n_models - 1)] + drawn
    names = [f"m{i}" for i in range(n_models)]
    return Battles.from_names(
        [names[a] for (a, _), _ in rows],
        [names[(a + step) % n_models] for (a, step), _ in rows],
        [WINNERS[w] for _, w in rows],
    )


# ---------------------------------------------------------------- online Elo


def test_elo_one_win_moves_each_side_by_half_k():
    assert ratings.elo_ratings(battles(("a", "b", "model_a"))).tolist() == [1002.0, 998.0]
    assert ratings.elo_ratings(battles(("a", "b", "model_b"))).tolist() == [998.0, 1002.0]


@pytest.mark.parametrize("tie", ["tie", "tie (bothbad)"])
def test_elo_tie_between_equals_changes_nothing(tie):
    assert ratings.elo_ratings(battles(("a", "b", tie))).tolist() == [1000.0, 1000.0]


def test_elo_second_win_against_a_weaker_side_gains_less():
    # After 1002 / 998, a is expected to score 1 / (1 + 10**(-4/400)) = 0.5057562.
    elo = ratings.elo_ratings(battles(("a", "b", "model_a"), ("a", "b", "model_a")))
    assert elo == pytest.approx([1002 + 4 * (1 - 0.5057562), 998 - 4 * (1 - 0.5057562)], abs=1e-6)


@bounded
@given(battle_tables())
def test_elo_conserves_the_total_and_mirrors(table):
    elo = ratings.elo_ratings(table)
    assert elo.sum() == pytest.approx(1000 * len(table.models), abs=1e-9)
    assert ratings.elo_ratings(mirrored(table)) == pytest.approx(elo, abs=1e-9)


def test_elo_on_resamples_replays_each_column_in_order():
    table = battles(("a", "b", "model_a"), ("a", "b", "model_b"), ("b", "c", "tie"))
    rows = np.array([[0, 1], [0, 2], [2, 0]])
    replayed = ratings.elo_on_resamples(table, rows)
    assert replayed[0] == pytest.approx(ratings.elo_ratings(table.take(rows[:, 0])))
    assert replayed[1] == pytest.approx(ratings.elo_ratings(table.take(rows[:, 1])))


# ---------------------------------------------------------------- Bradley-Terry


def test_bt_three_wins_in_four_means_odds_of_three():
    table = battles(*[("a", "b", "model_a")] * 3, ("a", "b", "model_b"))
    half_gap = 200 * math.log10(3)  # 10**(gap / 400) = 3
    assert ratings.bt_ratings(table) == pytest.approx([1000 + half_gap, 1000 - half_gap], abs=1e-6)


def test_bt_tie_is_half_a_win():
    # a: one win and one tie against b, a score of 1.5 in 2: odds 3, as above.
    table = battles(("a", "b", "model_a"), ("a", "b", "tie (bothbad)"))
    assert ratings.bt_ratings(table) == pytest.approx([1000 + 200 * math.log10(3), 1000 - 200 * math.log10(3)])


def test_bt_chain_fits_each_pair():
    # a beats b 2:1 and b beats c 2:1; a and c never met. Each pair's odds are 2, mean 1000.
    a_over_b = [("a", "b", "model_a")] * 2 + [("b", "a", "model_a")]
    b_over_c = [("b", "c", "model_a")] * 2 + [("c", "b", "model_a")]
    table = battles(*a_over_b, *b_over_c)
    step = 400 * math.log10(2)
    assert ratings.bt_ratings(table) == pytest.approx([1000 + step, 1000, 1000 - step], abs=1e-6)


def test_bt_symmetric_wins_give_equal_ratings():
    table = battles(("a", "b", "model_a"), ("a", "b", "model_b"), ("b", "c", "model_a"), ("c", "b", "model_a"))
    assert ratings.bt_ratings(table) == pytest.approx([1000, 1000, 1000], abs=1e-6)


def test_bt_anchor_pins_one_model():
    table = battles(*[("a", "b", "model_a")] * 3, ("a", "b", "model_b"))
    anchored = ratings.bt_ratings(table, ratings.RatingScale(anchor=("b", 1114.0)))
    assert anchored == pytest.approx([1114 + 400 * math.log10(3), 1114.0], abs=1e-6)


@bounded
@given(battle_tables(), st.randoms(use_true_random=False))
def test_bt_ignores_battle_order_and_seats(table, random):
    order = list(range(len(table)))
    random.shuffle(order)
    bt = ratings.bt_ratings(table)
    shuffled = table.take(np.array(order))
    by_name = dict(zip(shuffled.models, ratings.bt_ratings(shuffled)))
    assert [by_name[m] for m in table.models] == pytest.approx(bt, abs=1e-5)
    assert ratings.bt_ratings(mirrored(table)) == pytest.approx(bt, abs=1e-5)
    assert bt.mean() == pytest.approx(1000.0)


def test_outcome_cells_are_sorted_like_fastchats_unique_rows():
    table = battles(("b", "a", "model_a"), ("a", "b", "tie"), ("a", "b", "model_b"), ("a", "b", "tie"))
    cells = ratings.outcome_cells(table)
    # Models in order of first appearance: b = 0, a = 1.
    columns = (cells.model_a, cells.model_b, cells.score_a, cells.count)
    rows = list(zip(*(column.tolist() for column in columns)))
    assert rows == [(0, 1, 1.0, 1.0), (1, 0, 0.0, 1.0), (1, 0, 0.5, 2.0)]


# ---------------------------------------------------------------- bootstrap and rank


def known_strengths(n: int = 4000, seed: int = 3) -> Battles:
    rng = np.random.default_rng(seed)
    true = np.array([0.0, 100.0, 200.0])
    a = rng.integers(0, 3, n)
    b = (a + rng.integers(1, 3, n)) % 3
    a_wins = rng.random(n) < 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
    names = ["x", "y", "z"]
    winner = np.where(a_wins, "model_a", "model_b")
    return Battles.from_names([names[i] for i in a], [names[i] for i in b], winner)


def test_bootstrap_is_reproducible_and_contains_the_estimate():
    table = known_strengths()
    first, again = (ratings.bootstrap_bt(table, rounds=30, seed=7) for _ in range(2))
    assert np.array_equal(first.samples, again.samples)
    assert not np.array_equal(first.samples, ratings.bootstrap_bt(table, rounds=30, seed=8).samples)
    point = ratings.bt_ratings(table)
    assert np.all(first.lower <= point) and np.all(point <= first.upper)
    assert np.all(first.lower < first.median) and np.all(first.median < first.upper)


def test_elo_bootstrap_is_reproducible():
    table = known_strengths(500)
    first, again = (ratings.bootstrap_elo(table, rounds=8, seed=1) for _ in range(2))
    assert first.samples.shape == (8, 3) and np.array_equal(first.samples, again.samples)
    assert first.samples.sum(axis=1) == pytest.approx(3000.0)


def test_rank_counts_models_wholly_above():
    lower, upper = np.array([10.0, 5.0, 0.0, 9.0]), np.array([20.0, 8.0, 4.0, 15.0])
    # 0: none above; 1: 0 and 3 have lower > 8; 2: all three have lower > 4; 3: 0's lower 10 < 15.
    assert ratings.ranks(lower, upper).tolist() == [1, 3, 4, 1]


def test_leaderboard_ranks_anonymous_votes_best_first():
    table = known_strengths(3000)  # true ratings x 0, y 100, z 200
    table = replace(table, anony=np.arange(len(table)) % 10 != 0)
    board = leaderboard(table, rounds=20)
    assert board.models == ("z", "y", "x") and board.rank.tolist() == [1, 2, 3]
    assert np.all(np.diff(board.rating) < 0) and np.all(board.lower < board.rating)
    assert board.votes.sum() == 2 * int(table.anony.sum()) and board.style_rating is None


# ---------------------------------------------------------------- counts and matrices


def test_votes_counts_and_fractions():
    table = battles(("a", "b", "model_a"), ("b", "a", "model_a"), ("a", "b", "tie"), ("a", "c", "model_b"))
    assert ratings.votes_per_model(table).tolist() == [4, 3, 1]
    assert ratings.battle_counts(table).tolist() == [[0, 3, 1], [3, 0, 0], [1, 0, 0]]
    fractions = ratings.win_fractions(table)
    assert fractions[0, 1] == pytest.approx(1 / 3) and fractions[1, 0] == pytest.approx(1 / 3)
    assert fractions[2, 0] == 1.0 and fractions[0, 2] == 0.0 and np.isnan(fractions[1, 2])
    wins = ratings.pairwise_wins(table)
    assert wins[0, 1] == 1.5 and wins[1, 0] == 1.5 and wins[2, 0] == 1.0


def test_predicted_win_rates_from_ratings():
    rates = ratings.predicted_win_rates(np.array([1000.0, 1400.0]))  # 10**(400/400) = 10 to 1
    assert rates[1, 0] == pytest.approx(10 / 11) and rates[0, 1] == pytest.approx(1 / 11)
    assert rates[0, 0] == 0.5


# ---------------------------------------------------------------- style control


def test_style_counts_by_hand():
    answer = "# Title\n## Part\nText with **bold** and __more__.\n1. one\n- two\n```\n# not a header\n```\n"
    assert style_counts(answer).tolist() == [len(answer), 2, 2, 2]
    assert style_counts("plain", count_tokens=lambda text: 7).tolist() == [7, 0, 0, 0]
    assert pair_style("# a\n", "xyz").tolist() == pytest.approx([(4 - 3) / 8, 1 / 2, 0, 0])


def test_style_features_standardize_and_keep_constant_columns_at_zero():
    a = np.array([[10.0, 1, 0, 0], [30.0, 0, 0, 0], [20.0, 2, 0, 0]])
    table = battles(("a", "b", "model_a"), ("a", "b", "model_b"), ("b", "a", "tie"))
    table = replace(table, style_a=a, style_b=a[::-1].copy())
    features = ratings.style_features(table)
    assert features.mean(axis=0) == pytest.approx([0, 0, 0, 0]) and features[:, 2:].tolist() == [[0, 0]] * 3
    assert features[:, 0].std() == pytest.approx(1.0)


def test_style_control_without_style_differences_is_plain_bt():
    table = known_strengths(2000)
    same = np.tile([500.0, 2, 3, 1], (len(table), 1))
    styled = replace(table, style_a=same, style_b=same.copy())
    plain = ratings.bt_ratings(table)
    assert ratings.style_bt_ratings(styled, reg=0.0).ratings == pytest.approx(plain, abs=1e-5)
    # FastChat's penalty (reg 0.5) only shrinks the spread a little on 2,000 battles.
    assert ratings.style_bt_ratings(styled).ratings == pytest.approx(plain, abs=0.5)


def test_style_control_removes_a_length_bias():
    # Equal models; the answer's length alone decides the odds, and y answers longer.
    rng, n = np.random.default_rng(5), 6000
    a = rng.integers(0, 2, n)
    length = np.where(np.arange(2)[None, :] == 1, 900.0, 300.0) * rng.lognormal(0, 0.5, (n, 2))
    style = np.zeros((n, 2, 4))
    style[:, :, 0] = length
    length_a = np.where(a == 0, length[:, 0], length[:, 1])
    length_b = np.where(a == 0, length[:, 1], length[:, 0])
    a_wins = rng.random(n) < 1 / (1 + np.exp(-2.0 * ratings.style_differences(length_a, length_b)))
    table = Battles.from_names(
        np.where(a == 0, "x", "y"), np.where(a == 0, "y", "x"), np.where(a_wins, "model_a", "model_b"),
        style_a=np.column_stack([length_a, np.zeros((n, 3))]),
        style_b=np.column_stack([length_b, np.zeros((n, 3))]),
    )
    plain, controlled = ratings.bt_ratings(table), ratings.style_bt_ratings(table)
    assert abs(plain[0] - plain[1]) > 50
    assert abs(controlled.ratings[0] - controlled.ratings[1]) < 15
    assert controlled.coefficients[0] > 0 and controlled.coefficients[1:].tolist() == [0, 0, 0]


def test_style_features_need_style_counts():
    with pytest.raises(ValueError, match="no style counts"):
        ratings.style_features(battles(("a", "b", "model_a")))


# ---------------------------------------------------------------- reader and filters


def battle(model_a="a", model_b="b", winner="model_a", tstamp=1.0, anony=True, **extra) -> dict:
    return {"model_a": model_a, "model_b": model_b, "winner": winner, "tstamp": tstamp, "anony": anony, **extra}


def write_lines(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_reader_takes_jsonl_and_json_arrays(tmp_path):
    records = [battle(tstamp=3.0), battle("c", "a", "tie", 1.0, False), battle("b", "c", "model_b", 2.0)]
    write_lines(tmp_path / "b.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records, indent=2))
    for name in ("b.jsonl", "b.json"):
        table = read_battles(tmp_path / name)
        assert table.models == ("a", "c", "b") and table.winner.tolist() == [0, 2, 1]
        assert table.anony.tolist() == [True, False, True] and table.style_a is None
    ordered = sort_by_time(table)
    assert ordered.tstamp.tolist() == [1.0, 2.0, 3.0] and ordered.models == ("c", "b", "a")
    assert anonymous_only(table).models == ("a", "b", "c") and len(exclude_ties(table)) == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        (battle(winner="model_c"), "winner 'model_c' is not one of"),
        ({"model_a": "a", "model_b": "b", "tstamp": 1.0, "anony": True}, "missing field 'winner'"),
        (battle(anony="yes"), "anony must be true or false"),
        (battle(model_b="a"), "model_a and model_b are the same model"),
        (battle(conv_metadata={"sum_assistant_a_tokens": 3}), "missing field 'header_count_a'"),
    ],
)
def test_reader_names_the_bad_line(tmp_path, bad, message):
    write_lines(tmp_path / "b.jsonl", [battle(), battle(), bad])
    with pytest.raises(BattleFormatError, match=rf"b\.jsonl:3: {message}"):
        read_battles(tmp_path / "b.jsonl")
    (tmp_path / "b.json").write_text(json.dumps([battle(), battle(), bad], indent=2))
    # indent=2: "[" on line 1, then seven lines per five-field battle, so the third starts on 16.
    with pytest.raises(BattleFormatError, match=rf"b\.json:16: {message}"):
        read_battles(tmp_path / "b.json")


def test_reader_names_a_line_that_is_not_json(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(battle()) + "\n\n{not json\n")
    with pytest.raises(BattleFormatError, match=r"b\.jsonl:3: not valid JSON"):
        read_battles(tmp_path / "b.jsonl")


def test_reader_takes_style_from_metadata_or_conversations(tmp_path):
    metadata = {
        "sum_assistant_a_tokens": 120,
        "header_count_a": {"h1": 1, "h2": 2},
        "list_count_a": {"ordered": 1, "unordered": 0},
        "bold_count_a": {"**": 4, "__": 1},
        "sum_assistant_b_tokens": 80,
        "header_count_b": 0,
        "list_count_b": {"ordered": 0, "unordered": 2},
        "bold_count_b": {"**": 0, "__": 0},
    }
    conversation_a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "# Hi\n- x"}]
    conversation_b = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_lines(tmp_path / "b.jsonl", [
        battle(conv_metadata=metadata), battle(conversation_a=conversation_a, conversation_b=conversation_b),
    ])
    table = read_battles(tmp_path / "b.jsonl")
    assert table.style_a.tolist() == [[120, 3, 1, 5], [8, 1, 1, 0]]
    assert table.style_b.tolist() == [[80, 0, 2, 0], [5, 0, 0, 0]]
