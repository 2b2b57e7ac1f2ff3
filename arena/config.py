"""The arena web UI's configuration: its flags (for `chatfabric arena serve`, and for `chatfabric
up`'s arena), the `ArenaConfig` built from them and the listening socket. Nothing here imports the
web stack or the openai SDK, so `up` builds its parser without the arena's extra installed."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from typing import Mapping

from ..proto.defaults import DEFAULT_GATEWAY_URL, gateway_url
from .leaderboard_cli import positive_int, positive_seconds
from .session import Limits, Sampling

DEFAULT_PORT = 7860


@dataclass(frozen=True)
class ArenaConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    gateway_url: str = DEFAULT_GATEWAY_URL
    api_key: str | None = None
    weights: Mapping[str, float] = field(default_factory=dict)  # battle sampling weights; default 1
    limits: Limits = Limits()
    sampling: Sampling = Sampling()  # what battles ask both models for
    salt: bytes | None = None  # for client hashes; None: a new one per process
    concurrency: int = 64  # handlers Gradio runs at once (streams in flight)
    leaderboard_refresh: float = 10.0  # seconds between reads of the leaderboard snapshot
    title: str = "chatfabric arena"


def _weight(text: str) -> tuple[str, float]:
    model, sep, value = text.rpartition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not sep or not model or not (0.0 <= weight < float("inf")):
        raise argparse.ArgumentTypeError(f"expected MODEL=WEIGHT with a weight >= 0, got {text!r}")
    return model, weight


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of `chatfabric arena serve` (and of `chatfabric up`'s arena, with --arena- names)."""
    add_ui_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default: %(default)s)")
    p.add_argument("--gateway-url", default=gateway_url(),
                   help="the gateway's OpenAI API (default: $CHATFABRIC_GATEWAY_URL, else %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("CHATFABRIC_API_KEY"),
                   help="key for the gateway (default: $CHATFABRIC_API_KEY)")


def add_ui_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("arena")
    a.add_argument("--sampling-weight", action="append", type=_weight, default=[], metavar="MODEL=WEIGHT",
                   help="how often MODEL is drawn into battles, relative to 1 (the default); 0 keeps it out")
    a.add_argument("--max-turns", type=positive_int, default=Limits.max_turns,
                   help="questions per conversation (default: %(default)s)")
    a.add_argument("--max-input-chars", type=positive_int, default=Limits.max_input_chars,
                   help="characters per question (default: %(default)s)")
    a.add_argument("--rounds-per-minute", type=positive_int, default=Limits.rounds_per_minute,
                   help="new rounds and regenerations per client a minute (default: %(default)s)")
    a.add_argument("--votes-per-minute", type=positive_int, default=Limits.votes_per_minute,
                   help="votes and feedback per client a minute (default: %(default)s)")
    a.add_argument("--battle-max-tokens", type=positive_int, default=Sampling.max_tokens,
                   help="longest answer in a battle (default: %(default)s)")
    a.add_argument("--battle-temperature", type=float, default=Sampling.temperature,
                   help="battles' sampling temperature (default: %(default)s)")
    a.add_argument("--leaderboard-refresh", type=positive_seconds, default=ArenaConfig.leaderboard_refresh,
                   help="seconds between reads of the leaderboard snapshot (default: %(default)s)")
    a.add_argument("--client-salt", default=os.environ.get("CHATFABRIC_ARENA_SALT"),
                   help="secret mixed into client hashes (default: $CHATFABRIC_ARENA_SALT; else a new one per "
                   "start, so hashes do not link across restarts)")


def ui_config(args, **overrides) -> ArenaConfig:
    try:
        sampling = Sampling(temperature=args.battle_temperature, max_tokens=args.battle_max_tokens)
    except ValueError as err:
        raise ValueError(f"--battle-temperature / --battle-max-tokens: {err}") from None
    return ArenaConfig(
        weights=dict(args.sampling_weight),
        limits=Limits(max_turns=args.max_turns, max_input_chars=args.max_input_chars,
                      rounds_per_minute=args.rounds_per_minute, votes_per_minute=args.votes_per_minute),
        sampling=sampling,
        salt=args.client_salt.encode() if args.client_salt else None,
        leaderboard_refresh=args.leaderboard_refresh,
        **overrides,
    )


def config_from_args(args) -> ArenaConfig:
    return ui_config(args, host=args.host, port=args.port, gateway_url=args.gateway_url, api_key=args.api_key)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"the arena cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock
