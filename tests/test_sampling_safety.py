"""Sampling is numerically safe: every value the request schema accepts, in any combination,
gives a token id inside the vocabulary and never an error (extreme temperatures, top_p, penalties
and biases once made nan/inf probabilities, and one such request failed every request beside it)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chatfabric.worker.backend import Sampling
from chatfabric.worker.sampling import make_generator, pick_token, sample, top_p_filter, usable

EXTREME_FLOATS = [5e-324, 1e-310, 1e-300, 1e-38, 1e-30, 1e-5, 1e30, 1e300]

logit_values = st.one_of(
    st.floats(-50, 50),
    st.sampled_from([-math.inf, math.inf, math.nan, -3.4e38, 3.4e38, 0.0]),
)
bias_ids = st.one_of(st.integers(-5, 40), st.integers(-2**63, 2**63 - 1))


@st.composite
def samplings(draw) -> Sampling:
    """Sampling parameters over the ranges the request schema accepts (and past them where the
    worker might still see them: an infinite repetition penalty)."""
    max_tokens = draw(st.integers(1, 64))
    return Sampling(
        max_tokens=max_tokens,
        temperature=draw(st.one_of(st.floats(0, 2), st.sampled_from([0.0, *EXTREME_FLOATS[:6], 2.0]))),
        top_p=draw(st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from(EXTREME_FLOATS[:4] + [1.0]))),
        top_k=draw(st.one_of(st.integers(-1, 40), st.just(10**12))),
        min_tokens=draw(st.integers(0, max_tokens)),
        repetition_penalty=draw(st.one_of(st.floats(0, exclude_min=True), st.sampled_from([1.0, *EXTREME_FLOATS]))),
        presence_penalty=draw(st.floats(-2, 2)),
        frequency_penalty=draw(st.floats(-2, 2)),
        seed=draw(st.one_of(st.none(), st.integers(-2**200, 2**200))),
        stop_token_ids=frozenset(draw(st.lists(st.integers(-3, 40), max_size=40))),
        logit_bias=draw(st.dictionaries(bias_ids, st.floats(-100, 100), max_size=8)),
    )


@settings(max_examples=60, deadline=None)
@given(
    sampling=samplings(),
    row=st.lists(logit_values, min_size=1, max_size=40),
    prompt=st.lists(st.integers(0, 39), max_size=20),
    generated=st.integers(0, 64),
)
def test_every_accepted_parameter_gives_a_token_in_the_vocabulary(sampling, row, prompt, generated):
    logits = torch.tensor(row, dtype=torch.float32)
    vocab = logits.shape[0]
    seen = torch.tensor(sorted({t for t in prompt if t < vocab}), dtype=torch.long)
    counts = torch.bincount(seen, minlength=vocab)[:vocab]
    generator = None if sampling.greedy else make_generator(sampling.seed)
    token = pick_token(logits, sampling, seen, counts, generated, generator)
    assert 0 <= token < vocab


def test_a_tiny_temperature_is_greedy():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    for temperature in (5e-324, 1e-310, 1e-300, 1e-38):
        s = Sampling(max_tokens=1, temperature=temperature, seed=1)
        assert s.greedy and pick_token(logits.clone(), s, None, None, 0, None) == 1


def test_a_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    assert torch.isinf(top_p_filter(logits, 1e-300)).tolist() == [True, False, True, True]
    s = Sampling(max_tokens=1, temperature=1.0, top_p=1e-300)
    assert {sample(logits.clone(), s, make_generator(seed)) for seed in range(20)} == {1}


def test_extreme_repetition_penalties_stay_finite():
    logits = torch.tensor([2.0, 0.0, -2.0, 1.0])
    seen = torch.tensor([0, 1, 2])
    for penalty in (1e-300, 1e300, math.inf):
        s = Sampling(max_tokens=1, temperature=1.0, repetition_penalty=penalty, seed=3)
        token = pick_token(logits.clone(), s, seen, None, 0, make_generator(3))
        assert 0 <= token < 4
    # a huge penalty pushes every seen token below the unseen one
    s = Sampling(max_tokens=1, temperature=0.0, repetition_penalty=1e300)
    assert pick_token(torch.tensor([2.0, 0.5, 1.0]), s, torch.tensor([0, 2]), None, 0, None) == 1


def test_a_row_left_with_no_candidate_falls_back_to_the_raw_argmax():
    # min_tokens masks every token of this vocabulary: nothing is left to sample from
    for temperature in (0.0, 0.7):
        s = Sampling(max_tokens=4, temperature=temperature, min_tokens=2, stop_token_ids=frozenset(range(4)), seed=1)
        assert pick_token(torch.tensor([0.1, 0.2, 5.0, 0.3]), s, None, None, 0, make_generator(1)) == 2


def test_usable_turns_nan_and_inf_into_values_a_draw_can_use():
    row = usable(torch.tensor([math.nan, math.inf, -math.inf, 1.0]), torch.tensor(3))
    assert row[0] == -math.inf and row[1] == torch.finfo(torch.float32).max and row[3] == 1.0
    empty = usable(torch.tensor([math.nan, -math.inf]), torch.tensor(1))
    assert empty.tolist() == [-math.inf, 0.0]
