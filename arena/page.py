"""The arena's page: the Gradio Blocks of its four tabs (battle, side by side, direct chat,
leaderboard), each element wired to a handler of `handlers.Arena`."""

from __future__ import annotations

from typing import Awaitable, Callable

from .handlers import HIDDEN, MAX_CHAT_TOKENS, VOTES, Arena


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
