"""Sampling parameters for one model, without torch: `resolve_sampling` turns a request's
`SamplingParams` into the backend's `Sampling` (the model's defaults filled in, `max_tokens`
clamped to the context left), and `check_for_model` applies the rules that need the model.
The gateway has already applied every rule that does not (`proto.messages.SamplingParams`)."""

from __future__ import annotations

from ..proto.messages import SamplingParams
from ..models.templates import PromptError
from .backend import Sampling


class InvalidParameter(PromptError):
    """A sampling parameter this model cannot honour; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_for_model(params: SamplingParams, *, vocab: int, room: int) -> None:
    """The rules that need the model: token ids within its vocabulary, min_tokens within the
    context left after the prompt."""
    for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise InvalidParameter(f"{name}: token ids out of range [0, {vocab}): {bad[:5]}", name)
    if params.min_tokens > room:
        raise InvalidParameter(
            f"min_tokens ({params.min_tokens}) exceeds the {room} tokens left in the context after the prompt",
            "min_tokens",
        )


def resolve_sampling(
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
