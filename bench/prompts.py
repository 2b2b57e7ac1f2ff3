"""Benchmark prompts: a deterministic synthetic set, or the first turns of ShareGPT conversations."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education"
).split()


@dataclass(frozen=True)
class Prompt:
    text: str
    output_len: int
    earlier: tuple[dict, ...] = ()  # chat: the conversation's messages before this one


def synthetic(count: int, input_len: int, output_len: int, seed: int = 0) -> list[Prompt]:
    """`count` prompts of `input_len` words each (about as many tokens), the same for a given seed."""
    if count < 1 or input_len < 1 or output_len < 1:
        raise ValueError("count, input length and output length must be at least 1")
    rng = random.Random(seed)
    return [
        Prompt(f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(input_len)), output_len)
        for i in range(count)
    ]


def sharegpt(path: Path, count: int, output_len: int, seed: int = 0) -> list[Prompt]:
    """The first human turn of `count` conversations (sampled with `seed`; repeated if the file
    has fewer), each asking for `output_len` tokens."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read ShareGPT file {path}: {err}") from None
    firsts = []
    for conv in data if isinstance(data, list) else []:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if turns and isinstance(turns[0], dict) and turns[0].get("from") == "human" and turns[0].get("value"):
            firsts.append(turns[0]["value"])
    if not firsts:
        raise ValueError(f"{path} holds no ShareGPT conversations that start with a human turn")
    rng = random.Random(seed)
    order = [rng.choice(firsts) for _ in range(count)]
    return [Prompt(text, output_len) for text in order]
