"""Logit processing and sampling: small pure functions over one row of logits.

Order, as in vLLM and transformers: logit bias, min_tokens (stop tokens masked), repetition
penalty (prompt and output), presence and frequency penalties (output), then greedy argmax or
temperature, top-k, top-p and a draw from the request's own seeded generator.

Every accepted parameter value gives a token, never an error: `pick_token` turns the nan and inf
that extreme values produce into values the draw can use, and a row that the parameters leave
with no candidate at all falls back to the unprocessed row's argmax.
"""

from __future__ import annotations

import math

import torch

from .backend import Sampling


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> None:
    vocab = logits.shape[-1]
    for token, value in bias.items():
        if 0 <= token < vocab:
            logits[token] += value


def mask_tokens(logits: torch.Tensor, token_ids: frozenset[int]) -> None:
    vocab = logits.shape[-1]
    for token in token_ids:
        if 0 <= token < vocab:
            logits[token] = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> None:
    """transformers' rule over every token seen (prompt and output): divide positive logits by
    the penalty, multiply negative ones."""
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return
    # a penalty past the dtype's range would round to 0 or inf, and 0 * inf is nan
    limits = torch.finfo(logits.dtype)
    penalty = min(max(penalty, limits.tiny), limits.max)
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)


def apply_presence_frequency(
    logits: torch.Tensor, output_counts: torch.Tensor, presence: float, frequency: float
) -> None:
    """OpenAI's rule over generated tokens: subtract `frequency * count + presence * (count > 0)`."""
    if presence == 0.0 and frequency == 0.0:
        return
    counts = output_counts.to(logits.dtype)
    logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p`."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p  # the mass before this token already reaches p
    drop_sorted[0] = False  # a p that rounds to 0 in the logits' dtype would drop every token
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    sampling: Sampling,
    seen: torch.Tensor | None,
    output_counts: torch.Tensor | None,
    generated: int,
) -> torch.Tensor:
    """Apply every logit-changing parameter to one row (float32, modified in place)."""
    if sampling.logit_bias:
        apply_logit_bias(logits, sampling.logit_bias)
    if generated < sampling.min_tokens:
        mask_tokens(logits, sampling.stop_token_ids)
    apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    apply_presence_frequency(
        logits, output_counts, sampling.presence_penalty, sampling.frequency_penalty
    )
    return logits


def usable(logits: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Processed logits made safe to sample from, in place: nan is never chosen, +inf becomes the
    largest float, and a row with nothing left above -inf keeps only token `fallback` (a 0-d
    index). No device sync: this runs once per sampled row per step."""
    logits.nan_to_num_(nan=-math.inf, posinf=torch.finfo(logits.dtype).max, neginf=-math.inf)
    only_fallback = torch.full_like(logits, -math.inf).index_fill_(0, fallback.view(1), 0.0)
    return torch.where(torch.isneginf(logits).all(), only_fallback, logits)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Pick the next token from processed logits with at least one value above -inf and no nan
    (see `usable`)."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    # shifted so that the top logit is 0: no exp overflows and the softmax never sums to 0,
    # however small the temperature
    scaled = (logits - logits.max()) / sampling.temperature
    scaled = top_k_filter(scaled, sampling.top_k)
    scaled = top_p_filter(scaled, sampling.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def pick_token(
    logits: torch.Tensor,
    sampling: Sampling,
    seen: torch.Tensor | None,
    output_counts: torch.Tensor | None,
    generated: int,
    generator: torch.Generator | None,
) -> int:
    """The next token from one row of raw logits (float32, modified in place), with every
    parameter applied. Where the parameters leave no candidate (every token masked or pushed to
    -inf), the raw row's own argmax."""
    fallback = torch.argmax(logits)
    processed = process_logits(logits, sampling, seen, output_counts, generated)
    return sample(usable(processed, fallback), sampling, generator)


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator
