"""A conversation's second turn with and without the prefix cache: its time to first token
against the first turn's (a cold prefill of the whole history).

For each setting (the default, and the prefix cache off, alternating over `--rounds`) this
starts `chatfabric up --no-arena` on the default model (`--backend hf`, or `vllm`: vLLM's own
prefix caching, on and off with `--vllm-arg`) and holds `--conversations`
conversations one after the other through the gateway's chat endpoint: a first user message of
about `--history` tokens (distinct words per conversation, so nothing of it is cached before)
answered with `--answer` tokens, then a short second message that carries the whole history:

    python -m chatfabric.bench.prefix --history 1000 --output docs/results/prefix.jsonl

It prints and writes, per server, the median TTFT of each turn and their ratio."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

from ..proto.embedded import free_port
from .metrics import RequestResult
from .prompts import Prompt, synthetic
from .runner import Target, one_request
from .token_path import MODEL, Server

VLLM = ("--backend", "vllm", "--dtype", "float32", "--max-model-len", "2048")
SETUPS = {
    "hf": {"prefix cache": (), "no prefix cache": ("--no-prefix-cache",)},
    "vllm": {"prefix cache": VLLM, "no prefix cache": (*VLLM, "--vllm-arg", "enable_prefix_caching=false")},
}


async def turn(session: aiohttp.ClientSession, target: Target, prompt: Prompt) -> RequestResult:
    """One streamed greedy chat completion, which must succeed with some text."""
    result = await one_request(session, target, prompt)
    if not result.ok or result.first_token is None:
        raise RuntimeError(f"a turn failed: {result.error or 'no text'}")
    return result


async def conversations(port: int, args, seed: int) -> dict:
    target = Target(f"http://127.0.0.1:{port}/v1", MODEL, "chat", ignore_eos=False)
    firsts, seconds, lengths = [], [], []
    async with aiohttp.ClientSession() as session:
        # a warm-up conversation, not counted
        for prompt in synthetic(args.conversations + 1, args.history, args.answer, seed=seed):
            first = await turn(session, target, prompt)
            earlier = ({"role": "user", "content": prompt.text},
                       {"role": "assistant", "content": "".join(first.text)})
            second = await turn(session, target, Prompt("Go on.", args.answer, earlier))
            firsts.append(first.ttft * 1000)
            seconds.append(second.ttft * 1000)
            lengths.append(second.prompt_tokens)
    firsts, seconds, lengths = firsts[1:], seconds[1:], lengths[1:]
    return {"first_ttft_ms": statistics.median(firsts), "second_ttft_ms": statistics.median(seconds),
            "ratio": statistics.median(s / f for f, s in zip(firsts, seconds)),
            "first_all_ms": firsts, "second_all_ms": seconds, "second_prompt_tokens": lengths}


async def run(args) -> None:
    with tempfile.TemporaryDirectory(prefix="chatfabric-prefix-") as tmp:
        for round_ in range(1, args.rounds + 1):
            for index, (name, flags) in enumerate(SETUPS[args.backend].items()):
                port, folder = free_port(), Path(tmp) / f"{round_}-{index}"
                argv = [*shlex.split(args.chatfabric), "up", "--no-arena", "--port", str(port),
                        "--nats-port", str(free_port()), "--data-dir", str(folder), *flags]
                async with Server(argv, port, folder.with_suffix(".log"), MODEL, start_timeout=600):
                    row = await conversations(port, args, seed=round_)
                row.update(backend=args.backend, setup=name, round=round_, history=args.history, answer=args.answer,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                print(f"round {round_} {args.backend}, {name}: TTFT first turn {row['first_ttft_ms']:.0f} ms, second turn "
                      f"{row['second_ttft_ms']:.0f} ms (x{row['ratio']:.2f}; second prompts of "
                      f"{min(row['second_prompt_tokens'])}-{max(row['second_prompt_tokens'])} tokens)", flush=True)
                if args.output:
                    with open(args.output, "a") as out:
                        out.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=1000, help="words of the first message (about tokens)")
    parser.add_argument("--answer", type=int, default=32, help="tokens of each answer")
    parser.add_argument("--conversations", type=int, default=5, help="measured conversations per server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=sorted(SETUPS), default="hf")
    parser.add_argument("--chatfabric", default=f"{sys.executable} -m chatfabric.deploy.cli",
                        help="the command that runs chatfabric (default: this Python's)")
    parser.add_argument("--output", type=Path, help="append one JSON line per server to this file")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
