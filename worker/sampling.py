"""Logit processing and sampling: small pure functions over one row of logits.

Order, as in vLLM and transformers: logit bias, min_tokens (stop tokens masked), repetition
penalty (prompt and output), presence and frequency penalties (output), then greedy argmax or
temperature, top-k, top-p and a draw from the request's own seeded generator.
"""

from __future__ import annotations

import torch

from ..proto.messages import SamplingParams
from .backend import Sampling


def resolve(
    params: SamplingParams,
    *,
    room: int,
    eos_token_ids: frozenset[int],
    defaults: dict,
) -> Sampling:
    """Fill the client's unset parameters from the model's defaults and clamp max_tokens to `room`
    (the context left after the prompt)."""
    max_tokens = min(params.max_tokens or room, room)

    def pick(name: str, fallback):
        value = getattr(params, name)
        return value if value is not None else defaults.get(name, fallback)

    top_k = pick("top_k", 0)
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=0 if top_k in (None, -1) else int(top_k),
        min_tokens=min(params.min_tokens, max_tokens),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed,
        stop_token_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids),
        ignore_eos=params.ignore_eos,
        logit_bias=dict(params.logit_bias),
    )


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


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Pick the next token from processed logits."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    scaled = logits / sampling.temperature
    scaled = top_k_filter(scaled, sampling.top_k)
    scaled = top_p_filter(scaled, sampling.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator
