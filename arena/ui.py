"""`chatfabric arena serve`: the Chatbot Arena web UI (Gradio 6).

Tabs: an anonymous battle (two models drawn from the gateway's live `/v1/models`, hidden until
the vote), a named side-by-side battle, a direct chat, and the leaderboard. Models are reached
only through the gateway with the `openai` SDK (`arena/client.py`); votes, conversation logs and
feedback are events on the `ARENA` stream, stored with `Bus.publish_event`: a vote is confirmed
to the user only after JetStream acknowledged it, and a retried vote has the round's id, so it
is stored once. The browser's address appears in events only as a salted hash.

The Gradio app is mounted on a FastAPI app served by uvicorn inside this process's event loop,
on a socket bound here (a busy port is a clear error, port 0 picks a free one), next to the
bus connection the handlers use. `/healthz` answers for health checks.
"""


import asyncio
import contextlib
import logging
import math
import random
import socket
from typing import AsyncIterator, Awaitable, Callable, Sequence

from ..proto import tracing
from ..proto.events import Event, Feedback, new_id
from .client import Gateway, GatewayError, draw_pair
from .config import ArenaConfig, add_args, bind, config_from_args  # noqa: F401 (add_args: `arena serve`'s flags)
from .session import LimitReached, Sampling, RateLimiter, Round, Side, Turn, client_id, new_salt

log = logging.getLogger(__name__)
_tracer = tracing.tracer("chatfabric.arena")

MAX_CHAT_TOKENS = 4096  # the direct chat's max-tokens slider
VOTES = (("A is better", "model_a"), ("B is better", "model_b"), ("Tie", "tie"), ("Both are bad", "tie (bothbad)"))
HIDDEN = "Model A and Model B are hidden until you vote."
ADD_A_WORKER = ("Start another worker to add one, e.g. `chatfabric worker --model-path DIR --model-name NAME "
                "--nats-url URL`, or run everything with `chatfabric up --model-name a --model-name b`.")


async def run(args, stop: asyncio.Event) -> None:
    from ..proto.auth import auth_from_args
    from ..proto.bus import BusConfig, connect

    config = config_from_args(args)
    await asyncio.to_thread(_import_web_stack)  # a missing web stack is named before anything starts
    async with connect(BusConfig.from_env(url=args.nats_url), "chatfabric-arena", stop,
                       auth=auth_from_args(args), role="arena") as bus:
        await serve(bus, config, stop)


# -- the arena: handlers over one bus connection and one gateway client ---------------------------


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

    def battle_view(self, rnd: Round | None, status: str = "", text: str | None = "") -> tuple:
        """Outputs: state, chat A, chat B, names, status, input, then the four vote buttons."""
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
        return (rnd, *chats, names, status, box, *(votable,) * len(VOTES))

    async def send(self, text: str, rnd: Round | None, pick: tuple[str, str] | None, request) -> AsyncIterator[tuple]:
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

    async def regenerate(self, rnd: Round | None, request) -> AsyncIterator[tuple]:
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

    async def vote(self, winner: str, rnd: Round | None, request) -> tuple:
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

    async def new_round_clicked(self, rnd: Round | None, request) -> tuple:
        note = await self.log_round(rnd, self.client(request))
        return self.battle_view(None, note or "New round: ask a question to start.")

    async def clear(self, rnd: Round | None, request) -> tuple:
        """Start over with the same two models (still hidden in a battle)."""
        note = await self.log_round(rnd, self.client(request))
        if rnd is None:
            return self.battle_view(None, note)
        fresh = Round(tuple(Side(s.model, s.sampling) for s in rnd.sides), anonymous=rnd.anonymous)
        return self.battle_view(fresh, note or "Cleared: same models, new conversation.")

    # -- direct chat -----------------------------------------------------------------------

    def chat_view(self, side: Side | None, status: str = "", text: str | None = "") -> tuple:
        import gradio as gr

        box = gr.update() if text is None else gr.update(value=text)
        return side, side.display() if side else [], status, box

    async def chat(self, text: str, side: Side | None, model: str, temperature: float, top_p: float,
                   max_tokens: int, request) -> AsyncIterator[tuple]:
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

    async def chat_regenerate(self, side: Side | None, request) -> AsyncIterator[tuple]:
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

    async def feedback(self, kind: str, side: Side | None, request) -> tuple:
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

    async def chat_clear(self, side: Side | None, request) -> tuple:
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
    """The direct chat's sliders, checked: a client can send any JSON value for them."""
    try:
        t, p, n = float(temperature), float(top_p), float(max_tokens)
    except (TypeError, ValueError):
        t = p = n = math.nan
    if not (0 <= t <= 2 and 0 < p <= 1 and 1 <= n <= MAX_CHAT_TOKENS):
        raise ValueError(f"temperature must be within [0, 2], top_p within (0, 1], max tokens within "
                         f"[1, {MAX_CHAT_TOKENS}].")
    return Sampling(temperature=t, top_p=p, max_tokens=int(n))


# -- the page ------------------------------------------------------------------------------------


def build(arena: Arena):
    """The Gradio Blocks of the four tabs, wired to `arena`'s handlers."""
    import gradio as gr

    with gr.Blocks(title=arena.config.title) as demo:
        gr.Markdown(f"# {arena.config.title}\nChat with two models side by side and vote for the better "
                    "answer; the leaderboard is computed from the votes.")
        with gr.Tabs():
            with gr.Tab("Arena (battle)", id="battle"):
                _battle_panel(arena, anonymous=True)
            with gr.Tab("Arena (side by side)", id="side-by-side"):
                pickers = _battle_panel(arena, anonymous=False)
            with gr.Tab("Direct chat", id="direct"):
                chat_model = _direct_panel(arena)
            with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
                board = _leaderboard_panel(arena)

        async def refresh_models():
            live, said = await arena.model_choices()
            first, second = (live + ["", ""])[:2]
            return (gr.update(choices=live, value=first or None), gr.update(choices=live, value=second or None),
                    gr.update(choices=live, value=first or None), said)

        outputs = [*pickers[:2], chat_model, pickers[2]]
        demo.load(refresh_models, None, outputs)
        pickers[3].click(refresh_models, None, outputs)
        demo.load(arena.leaderboard, None, board)
        board_tab.select(arena.leaderboard, None, board)
        timer = gr.Timer(arena.config.leaderboard_refresh)
        timer.tick(arena.leaderboard, None, board)
    return demo


def _battle_panel(arena: Arena, anonymous: bool):
    import gradio as gr

    kind = "battle" if anonymous else "named"
    state = gr.State(None)
    pickers = []
    if anonymous:
        gr.Markdown("Ask anything: two anonymous models answer. Vote for the better one; their names are "
                    "revealed after your vote.")
    else:
        gr.Markdown("Pick two models, ask them the same question, and vote (counted apart from anonymous battles).")
        with gr.Row():
            pickers = [gr.Dropdown(label="Model A", elem_id="named-model-a", interactive=True),
                       gr.Dropdown(label="Model B", elem_id="named-model-b", interactive=True)]
        with gr.Row():
            live = gr.Markdown(elem_id="named-live")
            refresh = gr.Button("Refresh models", size="sm", elem_id="named-refresh")
    with gr.Row():
        chat_a = gr.Chatbot(label="Model A", elem_id=f"{kind}-chat-a", height=420, buttons=["copy"])
        chat_b = gr.Chatbot(label="Model B", elem_id=f"{kind}-chat-b", height=420, buttons=["copy"])
    names = gr.Markdown(HIDDEN if anonymous else "", elem_id=f"{kind}-names")
    with gr.Row():
        buttons = [gr.Button(label, interactive=False, elem_id=f"{kind}-vote-{i}") for i, (label, _) in enumerate(VOTES)]
    with gr.Row():
        box = gr.Textbox(show_label=False, placeholder="Ask both models…", scale=8, elem_id=f"{kind}-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{kind}-send")
    with gr.Row():
        new_round = gr.Button("New round", elem_id=f"{kind}-new")
        regenerate = gr.Button("Regenerate", elem_id=f"{kind}-regenerate")
        clear = gr.Button("Clear", elem_id=f"{kind}-clear")
    status = gr.Markdown(elem_id=f"{kind}-status")

    outputs = [state, chat_a, chat_b, names, status, box, *buttons]
    if anonymous:
        async def on_send(text, rnd, request: gr.Request):
            async for view in arena.send(text, rnd, None, request):
                yield view
        inputs = [box, state]
    else:
        async def on_send(text, rnd, a, b, request: gr.Request):
            async for view in arena.send(text, rnd, (a or "", b or ""), request):
                yield view
        inputs = [box, state, *pickers]

    async def on_regenerate(rnd, request: gr.Request):
        async for view in arena.regenerate(rnd, request):
            yield view

    async def on_new(rnd, request: gr.Request):
        return await arena.new_round_clicked(rnd, request)

    async def on_clear(rnd, request: gr.Request):
        return await arena.clear(rnd, request)

    send.click(on_send, inputs, outputs)
    box.submit(on_send, inputs, outputs)
    regenerate.click(on_regenerate, [state], outputs)
    new_round.click(on_new, [state], outputs)
    clear.click(on_clear, [state], outputs)
    for button, (_, winner) in zip(buttons, VOTES):
        button.click(_voter(arena, winner), [state], outputs)
    if anonymous:
        return []
    return [*pickers, live, refresh]


def _voter(arena: Arena, winner: str) -> Callable[..., Awaitable[tuple]]:
    import gradio as gr

    async def on_vote(rnd, request: gr.Request):
        return await arena.vote(winner, rnd, request)
    return on_vote


def _direct_panel(arena: Arena):
    import gradio as gr

    state = gr.State(None)
    with gr.Row():
        model = gr.Dropdown(label="Model", elem_id="direct-model", interactive=True, scale=3)
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.1, label="Temperature", elem_id="direct-temperature")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p", elem_id="direct-top-p")
        max_tokens = gr.Slider(16, MAX_CHAT_TOKENS, value=512, step=16, label="Max tokens", elem_id="direct-max-tokens")
    chat = gr.Chatbot(label="Chat", elem_id="direct-chat", height=450, buttons=["copy"])
    with gr.Row():
        box = gr.Textbox(show_label=False, placeholder="Send a message…", scale=8, elem_id="direct-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="direct-send")
    with gr.Row():
        feedback = [gr.Button(label, elem_id=f"direct-{kind}") for label, kind in
                    (("Upvote", "upvote"), ("Downvote", "downvote"), ("Flag", "flag"))]
        regenerate = gr.Button("Regenerate", elem_id="direct-regenerate")
        clear = gr.Button("Clear", elem_id="direct-clear")
    status = gr.Markdown(elem_id="direct-status")

    outputs = [state, chat, status, box]

    async def on_send(text, side, name, t, p, n, request: gr.Request):
        async for view in arena.chat(text, side, name, t, p, n, request):
            yield view

    async def on_regenerate(side, request: gr.Request):
        async for view in arena.chat_regenerate(side, request):
            yield view

    async def on_clear(side, request: gr.Request):
        return await arena.chat_clear(side, request)

    inputs = [box, state, model, temperature, top_p, max_tokens]
    send.click(on_send, inputs, outputs)
    box.submit(on_send, inputs, outputs)
    regenerate.click(on_regenerate, [state], outputs)
    clear.click(on_clear, [state], outputs)
    for button, kind in zip(feedback, ("upvote", "downvote", "flag")):
        button.click(_rater(arena, kind), [state], outputs)
    return model


def _rater(arena: Arena, kind: str):
    import gradio as gr

    async def on_feedback(side, request: gr.Request):
        return await arena.feedback(kind, side, request)
    return on_feedback


def _leaderboard_panel(arena: Arena):
    from .leaderboard_view import leaderboard_components

    return leaderboard_components()


# -- serving -------------------------------------------------------------------------------------


async def serve(bus, config: ArenaConfig, stop: asyncio.Event, *, sock: socket.socket | None = None,
                ready: Callable[[str], None] | None = None) -> None:
    """Serve the arena until `stop` is set. `ready(url)` is called once it listens."""
    # Importing Gradio takes seconds (tens, the first time, compiling it): never on the event
    # loop, which keeps the bus connection and, in `chatfabric up`, the gateway and workers going.
    await asyncio.to_thread(_import_web_stack)
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    sock = sock or bind(config.host, config.port)
    gateway = Gateway(config.gateway_url, config.api_key)
    arena = Arena(bus, gateway, config)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        ok = bus.connected
        return JSONResponse({"status": "ok" if ok else "bus unreachable"}, status_code=200 if ok else 503)

    def page():  # a second or two of CPU: off the event loop, where the bus and the models live
        demo = build(arena)
        demo.queue(default_concurrency_limit=config.concurrency)
        return gr.mount_gradio_app(app, demo, path="", footer_links=[], show_error=True)

    app = await asyncio.to_thread(page)
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    host, port = sock.getsockname()[:2]
    task = asyncio.create_task(server.serve(sockets=[sock]), name="arena-http")
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
            log.info("arena at %s (gateway %s)", url, config.gateway_url)
            if ready is not None:
                ready(url)
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        server.should_exit = True
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.close()
        sock.close()


def _import_web_stack() -> None:
    import importlib

    for module in ("gradio", "uvicorn", "fastapi"):
        importlib.import_module(module)


class _Server:
    """uvicorn's server without its signal handling: the `chatfabric` command owns signals."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)
