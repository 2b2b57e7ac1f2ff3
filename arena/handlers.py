"""The arena's handlers: what each button and box of the page does, over one bus connection
and one gateway client (`Arena`). Rounds, votes and limits are data in `session.py`; the page
that wires these handlers is `page.py`."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import AsyncIterator, NamedTuple, Sequence

from ..proto import tracing
from ..proto.events import WINNERS, Event, Feedback, new_id
from .client import Gateway, GatewayError, draw_pair
from .config import ArenaConfig
from .session import LimitReached, RateLimiter, Round, Sampling, Side, Turn, client_id, new_salt

log = logging.getLogger(__name__)
_tracer = tracing.tracer("chatfabric.arena")

MAX_CHAT_TOKENS = 4096  # the direct chat's max-tokens slider
VOTES = tuple(zip(("A is better", "B is better", "Tie", "Both are bad"), WINNERS))  # (button, winner)
HIDDEN = "Model A and Model B are hidden until you vote."
ADD_A_WORKER = ("Start another worker to add one, e.g. `chatfabric worker --model-path DIR --model-name NAME "
                "--nats-url URL`, or run everything with `chatfabric up --model-name a --model-name b`.")


class BattleView(NamedTuple):
    """What a battle panel shows after a handler, in the order of its Gradio outputs."""

    round: Round | None
    chat_a: list
    chat_b: list
    names: str
    status: str
    input: object  # the question box's update
    vote_a: object  # the four vote buttons' updates
    vote_b: object
    vote_tie: object
    vote_bad: object


class ChatView(NamedTuple):
    """What the direct chat shows after a handler, in the order of its Gradio outputs."""

    side: Side | None
    chat: list
    status: str
    input: object


class NotEnoughModels(Exception):
    pass


def _hide(text: str, model: str, alias: str) -> str:
    """An error text with the model's name replaced: an anonymous battle must not leak it."""
    return text.replace(model, alias) if model else text


class Arena:
    """The handlers behind the UI. Each browser session's state is a `Round` (battles) or a
    `Side` (direct chat) held by Gradio; this object is shared by all sessions."""

    def __init__(self, bus, gateway: Gateway, config: ArenaConfig):
        self.bus, self.gateway, self.config = bus, gateway, config
        self.limits = config.limits
        self.round_limit = RateLimiter(config.limits.rounds_per_minute, "new rounds")
        self.vote_limit = RateLimiter(config.limits.votes_per_minute, "votes")
        self.salt = config.salt or new_salt()
        self.rng = random.Random()

    def client(self, request) -> str:
        address = getattr(getattr(request, "client", None), "host", None)
        return client_id(self.salt, address)

    async def record(self, events: Sequence[Event]) -> bool:
        """Store every event; True when the last one was stored before (a retry)."""
        duplicate = False
        with _tracer.start_as_current_span("arena.record", attributes={
                "chatfabric.events": [type(e).__name__ for e in events]}):
            for event in events:
                duplicate = (await self.bus.publish_event(event)).duplicate
        return duplicate

    # -- rounds ----------------------------------------------------------------------------

    async def new_round(self, client: str, pick: tuple[str, str] | None) -> Round:
        """A round between two drawn models (a battle), or between `pick` (side by side)."""
        self.round_limit.take(client)
        live = await self.gateway.models()
        if pick is None:
            try:
                a, b = draw_pair(live, self.config.weights, self.rng)
            except ValueError:
                raise NotEnoughModels(f"A battle needs two live models; the gateway serves {len(live)}"
                                      f"{': ' + ', '.join(live) if live else ''}. {ADD_A_WORKER}") from None
        else:
            a, b = pick
            if not a or not b:
                raise NotEnoughModels("Pick a model for each side.")
            missing = [m for m in (a, b) if m not in live]
            if missing:
                raise NotEnoughModels(f"Not served right now: {', '.join(missing)}. Refresh the model lists.")
        sampling = self.config.sampling
        return Round((Side(a, sampling), Side(b, sampling)), anonymous=pick is None)

    async def log_round(self, rnd: Round | None, client: str) -> str:
        """Store an unvoted round's conversations as it ends; a line for the user if that failed."""
        if rnd is None or rnd.logged or rnd.vote is not None or not rnd.logs(client):
            return ""
        try:
            await self.record(rnd.logs(client))
        except Exception as err:
            log.warning("conversation logs not stored: %s", err)
            return f"The last conversation could not be logged ({err})."
        rnd.logged = True
        return ""

    async def answer(self, sides: Sequence[Side], aliases: Sequence[str] | None) -> AsyncIterator[None]:
        """Stream every side's answer to its last question concurrently; yields whenever some
        text arrived, and once more when all are done. Leaving early cancels the streams."""
        changed: asyncio.Queue[bool] = asyncio.Queue()

        async def pump(side: Side, alias: str | None) -> None:
            turn = side.turns[-1]
            try:
                async for delta in self.gateway.stream(side.model, side.request(), side.sampling):
                    turn.answer += delta
                    changed.put_nowait(True)
            except GatewayError as err:
                turn.error = _hide(str(err), side.model, alias) if alias else str(err)
            except Exception:
                log.exception("streaming from %s failed", side.model)
                turn.error = "The arena failed to read this answer (logged on the server)."
            finally:
                turn.done = True
                changed.put_nowait(False)

        tasks = [asyncio.create_task(pump(side, aliases[i] if aliases else None)) for i, side in enumerate(sides)]
        try:
            running = len(tasks)
            while running:
                running -= not await changed.get()
                while not changed.empty():
                    running -= not changed.get_nowait()
                yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- battle handlers (anonymous and side by side) --------------------------------------

    def battle_view(self, rnd: Round | None, status: str = "", text: str | None = "") -> BattleView:
        import gradio as gr

        chats = rnd.sides[0].display() if rnd else [], rnd.sides[1].display() if rnd else []
        if rnd is None:
            names = HIDDEN
        elif rnd.anonymous and rnd.vote is None:
            names = HIDDEN
        else:
            names = f"Model A: **{rnd.sides[0].model}** · Model B: **{rnd.sides[1].model}**"
        votable = gr.update(interactive=rnd is not None and rnd.can_vote)
        box = gr.update() if text is None else gr.update(value=text)
        return BattleView(rnd, *chats, names, status, box, *(votable,) * len(VOTES))

    async def send(self, text: str, rnd: Round | None, pick: tuple[str, str] | None, request) -> AsyncIterator[BattleView]:
        client = self.client(request)
        try:
            if rnd is not None and rnd.streaming:
                raise LimitReached("Wait until both answers are complete.")
            if rnd is not None and rnd.vote is not None:
                raise LimitReached("You voted on this round: start a new round to ask again.")
            note = ""
            if rnd is None or (pick is not None and pick != (rnd.sides[0].model, rnd.sides[1].model)):
                note = await self.log_round(rnd, client)
                text = self.limits.check_input(text, 0)
                rnd = await self.new_round(client, pick)
            else:
                text = self.limits.check_input(text, rnd.turns)
        except (LimitReached, NotEnoughModels, GatewayError) as err:
            yield self.battle_view(rnd, str(err), text=None)
            return
        rnd.ask(text)
        yield self.battle_view(rnd, note)
        async for _ in self.answer(rnd.sides, ("Model A", "Model B") if rnd.anonymous else None):
            yield self.battle_view(rnd, note)
        yield self.battle_view(rnd, note or self._after_answer(rnd))

    @staticmethod
    def _after_answer(rnd: Round) -> str:
        if rnd.can_vote:
            return "Which answer is better? Vote, or keep asking both."
        return "One side failed: regenerate, or start a new round."

    async def regenerate(self, rnd: Round | None, request) -> AsyncIterator[BattleView]:
        if rnd is None or rnd.turns == 0 or rnd.streaming or rnd.vote is not None:
            yield self.battle_view(rnd, "Nothing to regenerate." if rnd is None or rnd.vote is None
                                   else "You voted on this round: start a new round.", text=None)
            return
        try:
            self.round_limit.take(self.client(request))
        except LimitReached as err:
            yield self.battle_view(rnd, str(err), text=None)
            return
        rnd.retry_last()
        async for _ in self.answer(rnd.sides, ("Model A", "Model B") if rnd.anonymous else None):
            yield self.battle_view(rnd, "", text=None)
        yield self.battle_view(rnd, self._after_answer(rnd), text=None)

    async def vote(self, winner: str, rnd: Round | None, request) -> BattleView:
        if rnd is None or rnd.turns == 0:
            return self.battle_view(rnd, "Ask both models something first.", text=None)
        if rnd.vote is not None:
            return self.battle_view(rnd, "This round's vote is already recorded.", text=None)
        if not rnd.can_vote:
            return self.battle_view(rnd, "Both answers must be complete (and without errors) to vote.", text=None)
        client = self.client(request)
        try:
            self.vote_limit.take(client)
            logs = [] if rnd.logged else rnd.logs(client)
            duplicate = await self.record([*logs, rnd.vote_event(winner, client)])
        except LimitReached as err:
            return self.battle_view(rnd, str(err), text=None)
        except Exception as err:
            log.warning("vote %s not stored: %s", rnd.vote_id, err)
            return self.battle_view(rnd, f"Your vote was **not recorded**: the event bus did not confirm it ({err}). "
                                    "Press the button again to retry: it will be counted once.", text=None)
        rnd.vote, rnd.logged = winner, True
        said = dict((w, label) for label, w in VOTES)[winner]
        again = " (it had already been recorded)" if duplicate else ""
        return self.battle_view(rnd, f"Thanks! Your vote, {said}, is recorded{again}. Start a new round to go on.",
                                text=None)

    async def new_round_clicked(self, rnd: Round | None, request) -> BattleView:
        note = await self.log_round(rnd, self.client(request))
        return self.battle_view(None, note or "New round: ask a question to start.")

    async def clear(self, rnd: Round | None, request) -> BattleView:
        """Start over with the same two models (still hidden in a battle)."""
        note = await self.log_round(rnd, self.client(request))
        if rnd is None:
            return self.battle_view(None, note)
        fresh = Round(tuple(Side(s.model, s.sampling) for s in rnd.sides), anonymous=rnd.anonymous)
        return self.battle_view(fresh, note or "Cleared: same models, new conversation.")

    # -- direct chat -----------------------------------------------------------------------

    def chat_view(self, side: Side | None, status: str = "", text: str | None = "") -> ChatView:
        import gradio as gr

        box = gr.update() if text is None else gr.update(value=text)
        return ChatView(side, side.display() if side else [], status, box)

    async def chat(self, text: str, side: Side | None, model: str, temperature: float, top_p: float,
                   max_tokens: int, request) -> AsyncIterator[ChatView]:
        client = self.client(request)
        try:
            if side is not None and not side.finished and side.turns:
                raise LimitReached("Wait until the answer is complete.")
            if not model:
                raise LimitReached("Pick a model first.")
            sampling = _chat_sampling(temperature, top_p, max_tokens)
            if side is None or side.model != model:
                note = await self.log_side(side, client)
                text = self.limits.check_input(text, 0)
                self.round_limit.take(client)
                side = Side(model, sampling)
            else:
                note = ""
                text = self.limits.check_input(text, len(side.turns))
                side.sampling = sampling
        except (LimitReached, ValueError) as err:
            yield self.chat_view(side, str(err), text=None)
            return
        side.turns.append(Turn(text))
        yield self.chat_view(side, note)
        async for _ in self.answer([side], None):
            yield self.chat_view(side, note)
        yield self.chat_view(side, note)

    async def chat_regenerate(self, side: Side | None, request) -> AsyncIterator[ChatView]:
        if side is None or not side.turns or not side.finished:
            yield self.chat_view(side, "Nothing to regenerate.", text=None)
            return
        try:
            self.round_limit.take(self.client(request))
        except LimitReached as err:
            yield self.chat_view(side, str(err), text=None)
            return
        side.turns[-1] = Turn(side.turns[-1].user)
        async for _ in self.answer([side], None):
            yield self.chat_view(side, "", text=None)
        yield self.chat_view(side, "", text=None)

    async def log_side(self, side: Side | None, client: str) -> str:
        if side is None or not any(t.done and t.error is None for t in side.turns):
            return ""
        try:
            await self.record([side.log(client)])
        except Exception as err:
            return f"The last conversation could not be logged ({err})."
        return ""

    async def feedback(self, kind: str, side: Side | None, request) -> ChatView:
        if side is None or not side.finished or not any(t.error is None for t in side.turns):
            return self.chat_view(side, "Chat first, then rate the answers.", text=None)
        client = self.client(request)
        event = Feedback(id=f"{side.conversation}-{kind}", kind=kind, model=side.model,
                         conversation=side.conversation, client=client)
        try:
            self.vote_limit.take(client)
            duplicate = await self.record([side.log(client), event])
        except LimitReached as err:
            return self.chat_view(side, str(err), text=None)
        except Exception as err:
            return self.chat_view(side, f"Not recorded: the event bus did not confirm it ({err}). Try again.",
                                  text=None)
        # the conversation may go on: later turns get a new log id, so the stored one stays whole
        side.conversation = new_id()
        return self.chat_view(side, f"Recorded: {kind}{' (already)' if duplicate else ''}. Thank you.", text=None)

    async def chat_clear(self, side: Side | None, request) -> ChatView:
        note = await self.log_side(side, self.client(request))
        return self.chat_view(None, note)

    # -- models and leaderboard ------------------------------------------------------------

    async def model_choices(self) -> tuple[list[str], str]:
        try:
            live = list(await self.gateway.models(max_age=0))
        except GatewayError as err:
            return [], str(err)
        if not live:
            return [], f"No model is served right now. {ADD_A_WORKER}"
        return live, f"{len(live)} live model{'s' if len(live) != 1 else ''}: {', '.join(live)}"

    async def leaderboard(self):
        from .leaderboard_view import leaderboard_outputs

        return await leaderboard_outputs(self.bus)


def _chat_sampling(temperature, top_p, max_tokens) -> Sampling:
    """The direct chat's sliders, checked by the sampling rules (`Sampling`) and the chat's own
    token cap: a client can send any JSON value for them."""
    try:
        tokens = int(float(max_tokens))
        if tokens > MAX_CHAT_TOKENS:
            raise ValueError(tokens)
        return Sampling(temperature=float(temperature), top_p=float(top_p), max_tokens=tokens)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"temperature must be within [0, 2], top_p within (0, 1], max tokens within "
                         f"[1, {MAX_CHAT_TOKENS}].") from None
