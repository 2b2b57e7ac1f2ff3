"""What one browser session holds: the conversations of a round, their votes, and the limits
every session is held to. Plain data and rules, no UI and no I/O, so they are tested alone."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..proto.events import ConversationLog, Vote, new_id
from ..proto.messages import ChatMessage, SamplingFields, SamplingParams


@dataclass(frozen=True)
class Sampling:
    """What the arena asks a model for, checked by the fabric's own sampling rules
    (`SamplingFields`): an out-of-range value is a ValueError naming the field."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        try:
            SamplingFields(**self.as_dict())
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    def as_dict(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


class LimitReached(Exception):
    """A session limit; `str()` tells the user which and what to do."""


@dataclass(frozen=True)
class Limits:
    max_turns: int = 8  # user messages per conversation
    max_input_chars: int = 4000  # per user message
    rounds_per_minute: int = 20  # new rounds (and regenerations) per client
    votes_per_minute: int = 20  # votes and feedback per client

    def __post_init__(self) -> None:
        if min(self.max_turns, self.max_input_chars, self.rounds_per_minute, self.votes_per_minute) < 1:
            raise ValueError("arena limits must be at least 1")

    def check_input(self, text: str, turns: int) -> str:
        """The user's message, stripped, or LimitReached saying why it cannot be sent."""
        text = text.strip()
        if not text:
            raise LimitReached("Type a message first.")
        if len(text) > self.max_input_chars:
            raise LimitReached(f"Your message has {len(text):,} characters; the limit is {self.max_input_chars:,}.")
        if turns >= self.max_turns:
            raise LimitReached(f"This conversation reached its {self.max_turns} turns. Start a new round.")
        return text


class RateLimiter:
    """At most `per_minute` actions per client in any sliding minute (in this process)."""

    def __init__(self, per_minute: int, what: str, clock=time.monotonic):
        self.per_minute, self.what, self.clock = per_minute, what, clock
        self._times: dict[str, deque[float]] = {}

    def take(self, client: str) -> None:
        now = self.clock()
        times = self._times.setdefault(client, deque())
        while times and now - times[0] >= 60.0:
            times.popleft()
        if len(times) >= self.per_minute:
            wait = 60.0 - (now - times[0])
            raise LimitReached(f"Too many {self.what} from you: at most {self.per_minute} a minute. "
                               f"Try again in {wait:.0f} s.")
        times.append(now)
        if len(self._times) > 10_000:  # forget idle clients
            for key in [k for k, v in self._times.items() if not v or now - v[-1] >= 60.0]:
                del self._times[key]


def client_id(salt: bytes, address: str | None) -> str:
    """How events name a client: a salted hash of its address, never the address."""
    return hashlib.sha256(salt + (address or "unknown").encode()).hexdigest()[:32]


def new_salt() -> bytes:
    return secrets.token_bytes(16)


@dataclass
class Turn:
    user: str
    answer: str = ""
    error: str | None = None
    done: bool = False


@dataclass
class Side:
    """One model's conversation in a round."""

    model: str
    sampling: Sampling
    conversation: str = field(default_factory=new_id)  # the ConversationLog id
    turns: list[Turn] = field(default_factory=list)

    def request(self) -> list[dict[str, str]]:
        """The messages to send for the last turn: earlier turns that were answered, then it."""
        messages = []
        for turn in self.turns[:-1]:
            if turn.done and turn.error is None:
                messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.answer}]
        return messages + [{"role": "user", "content": self.turns[-1].user}]

    def display(self) -> list[dict[str, str]]:
        """The chat as the Chatbot shows it; an error appears where the answer would."""
        shown = []
        for turn in self.turns:
            shown.append({"role": "user", "content": turn.user})
            if turn.error is not None:
                shown.append({"role": "assistant", "content": f"**Error:** {turn.error}"})
            elif turn.answer or not turn.done:
                shown.append({"role": "assistant", "content": turn.answer})
        return shown

    @property
    def finished(self) -> bool:
        return bool(self.turns) and all(t.done for t in self.turns)

    @property
    def failed(self) -> bool:
        return any(t.error is not None for t in self.turns)

    def log(self, client: str) -> ConversationLog:
        messages = []
        for turn in self.turns:
            if turn.done and turn.error is None:
                messages += [ChatMessage(role="user", content=turn.user),
                             ChatMessage(role="assistant", content=turn.answer)]
        s = self.sampling
        return ConversationLog(id=self.conversation, model=self.model, messages=tuple(messages), client=client,
                               sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                                       max_tokens=s.max_tokens))


@dataclass
class Round:
    """Two sides asked the same questions; anonymous (a battle) or named (side by side)."""

    sides: tuple[Side, Side]
    anonymous: bool
    vote_id: str = field(default_factory=new_id)  # one per round: a retried vote is stored once
    vote: str | None = None  # the winner, once JetStream stored the vote
    logged: bool = False  # the conversation logs were stored

    @property
    def turns(self) -> int:
        return len(self.sides[0].turns)

    @property
    def streaming(self) -> bool:
        return any(not side.finished for side in self.sides if side.turns)

    @property
    def can_vote(self) -> bool:
        return (self.vote is None and self.turns > 0 and all(s.finished for s in self.sides)
                and not any(s.failed for s in self.sides))

    def ask(self, text: str) -> None:
        for side in self.sides:
            side.turns.append(Turn(text))

    def retry_last(self) -> None:
        """Regenerate: both sides answer the last question again."""
        for side in self.sides:
            last = side.turns[-1]
            side.turns[-1] = Turn(last.user)

    def vote_event(self, winner: str, client: str) -> Vote:
        a, b = self.sides
        return Vote(id=self.vote_id, winner=winner, model_a=a.model, model_b=b.model, anonymous=self.anonymous,
                    conversation_a=a.conversation, conversation_b=b.conversation, client=client)

    def logs(self, client: str) -> list[ConversationLog]:
        return [side.log(client) for side in self.sides if any(t.done and t.error is None for t in side.turns)]
