"""The continuous-batching engines on the real model: batched output equals solo output,
per-request sampling inside one batch, cancellation frees the slot, the KV budget holds,
chunked prefill changes nothing but latency, and a failure fails only the requests it concerns
and hands back their cache. Each test runs on both engines: the padded one (the CPU default)
and the slot one (the CUDA default, here without CUDA graphs)."""

from __future__ import annotations

import asyncio
import time

import pytest

from chatfabric.proto.messages import ChatMessage, SamplingParams
from chatfabric.worker import engine as engine_module
from chatfabric.worker.backend import Sampling
from chatfabric.worker.engine import BatchEngine, KVCacheFull, TooLargeForCache
from chatfabric.worker.hf import HFBackend
from chatfabric.worker.prompting import PromptBuilder
from chatfabric.worker.params import resolve_sampling
from chatfabric.worker.slots import SlotEngine

QUESTIONS = [
    "What is the capital of France?",
    "Write a poem about the sea.",
    "Explain gravity in one sentence.",
    "List three fruits.",
    "hi",
    "Tell me a story about a dragon and a knight who become friends.",
]


SLOT_LENGTH = 3_200  # room for the longest request below (~40 prompt + 3000 tokens)


@pytest.fixture(scope="module", params=["padded", "slots"])
def backend(request, model_dir):
    b = HFBackend.load(model_dir, "cpu", "float32", max_batch=8, kv_cache_tokens=20_000, engine=request.param,
                       slot_length=SLOT_LENGTH)
    assert isinstance(b.engine, SlotEngine) == (request.param == "slots")
    yield b
    b.engine.close()


@pytest.fixture(scope="module")
def prompts(backend):
    builder = PromptBuilder(backend.tokenizer)
    return [builder.chat_ids([ChatMessage(role="user", content=q)]) for q in QUESTIONS]


def engine_like(backend, model=None, slot_length=SLOT_LENGTH, **overrides) -> BatchEngine:
    """A fresh engine of the same kind as the backend's, with some settings changed."""
    args = dict(vocab_size=backend.engine.vocab_size, device="cpu", max_batch=8, kv_budget_tokens=20_000,
                cache_arg=backend.engine._cache_arg)
    if isinstance(backend.engine, SlotEngine):
        return SlotEngine(model or backend.model, **{**args, "slot_length": slot_length, **overrides})
    return BatchEngine(model or backend.model, **{**args, **overrides})


def is_idle(engine) -> bool:
    return not engine._incoming and not engine._prefilling and not engine._running


async def until_idle(engine, budget: int, timeout: float = 30.0) -> None:
    """Wait until every KV reservation is back and the engine holds no sequence."""
    deadline = time.monotonic() + timeout
    while not (engine.kv_free_tokens == budget and is_idle(engine)):
        assert time.monotonic() < deadline, (
            f"engine not idle after {timeout}s: {engine.kv_free_tokens} of {budget} KV tokens free")
        await asyncio.sleep(0.02)


def sampling(backend, **params):
    return resolve_sampling(SamplingParams(**params), room=4000, eos_token_ids=backend.eos_token_ids, defaults={})


async def tokens(engine, ids, s, delay=0.0):
    await asyncio.sleep(delay)
    return [event.token_id async for event in engine.generate(ids, s)]


def test_batched_greedy_equals_solo(backend, prompts):
    engine = backend.engine
    s = sampling(backend, temperature=0, max_tokens=24, ignore_eos=True)

    async def run():
        solo = [await tokens(engine, p, s) for p in prompts]
        # staggered arrivals: each request joins a batch that is already decoding
        together = await asyncio.gather(*[tokens(engine, p, s, delay=0.15 * i) for i, p in enumerate(prompts)])
        return solo, together

    solo, together = asyncio.run(run())
    assert together == solo
    assert engine.max_running >= 3


def reshuffles(engine) -> int:
    """How often a joining or surviving sequence was moved into a finished one's cache row."""
    return engine.rows_moved if isinstance(engine, SlotEngine) else engine.holes_filled


def test_a_join_into_a_finished_row_changes_nothing(backend, prompts):
    engine = backend.engine
    long_run = sampling(backend, temperature=0, max_tokens=40, ignore_eos=True)
    short_run = sampling(backend, temperature=0, max_tokens=3, ignore_eos=True)

    async def run():
        solo = [await tokens(engine, prompts[0], long_run), await tokens(engine, prompts[4], long_run)]
        filled = reshuffles(engine)

        async def late_joiner():
            await tokens(engine, prompts[3], short_run)  # finishes first and leaves a hole
            return await tokens(engine, prompts[4], long_run)  # short prompt: fits the hole

        # the short request takes the first row; when it finishes, the long one runs on beside its
        # empty row (padded engine: a hole that the late joiner fills) or moves into it (slots)
        joined, ran = await asyncio.gather(late_joiner(), tokens(engine, prompts[0], long_run))
        return solo, [ran, joined], reshuffles(engine) - filled

    solo, together, filled = asyncio.run(run())
    assert filled >= 1
    assert together == solo


def test_per_request_sampling_inside_one_batch(backend, prompts):
    engine = backend.engine
    configs = [
        sampling(backend, temperature=0.9, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True),
        sampling(backend, temperature=1.2, top_k=20, seed=12, max_tokens=16, ignore_eos=True),
        sampling(backend, temperature=0, repetition_penalty=1.3, max_tokens=16, ignore_eos=True),
        sampling(backend, temperature=0.7, presence_penalty=1.5, frequency_penalty=0.5, seed=13, max_tokens=16,
                 ignore_eos=True),
    ]

    async def run():
        solo = [await tokens(engine, p, s) for p, s in zip(prompts, configs)]
        together = await asyncio.gather(*[tokens(engine, p, s) for p, s in zip(prompts, configs)])
        return solo, together

    solo, together = asyncio.run(run())
    assert together == solo


def test_stop_tokens_and_max_tokens_end_sequences(backend, prompts):
    async def run():
        events = [e async for e in backend.engine.generate(prompts[0], sampling(backend, temperature=0, max_tokens=50))]
        return events

    events = asyncio.run(run())
    assert events[-1].finish_reason == "stop" and events[-1].token_id in backend.eos_token_ids
    assert all(e.finish_reason is None for e in events[:-1])


def test_cancellation_frees_the_slot_and_the_budget(backend, prompts):
    engine = backend.engine

    async def run():
        full = engine.kv_free_tokens
        gen = engine.generate(prompts[1], sampling(backend, temperature=0, max_tokens=3000, ignore_eos=True))
        other = asyncio.create_task(tokens(engine, prompts[2], sampling(backend, temperature=0, max_tokens=12,
                                                                        ignore_eos=True)))
        got = [await gen.__anext__() for _ in range(3)]
        assert engine.kv_free_tokens < full
        await gen.aclose()  # what a cancelled request does
        finished = await asyncio.wait_for(other, timeout=120)
        for _ in range(100):
            if engine.kv_free_tokens == full and is_idle(engine):
                break
            await asyncio.sleep(0.05)
        return got, finished, full

    got, finished, full = asyncio.run(run())
    assert len(got) == 3 and len(finished) == 12
    assert engine.kv_free_tokens == full
    assert is_idle(engine)


def test_a_first_token_leaves_before_the_running_batch_decodes(backend, prompts):
    """Tokens reach the event loop as soon as a pass has sampled them: a newcomer's first token
    arrives while the decode pass of the same iteration (here held until released) still runs."""
    import threading

    engine = engine_like(backend)
    budget = engine.kv_free_tokens
    held, release = threading.Event(), threading.Event()
    plain_decode = engine._decode

    def decode_held_once_both_run():
        if len(engine._running) >= 2 and not release.is_set():
            held.set()
            release.wait(60)
        plain_decode()

    engine._decode = decode_held_once_both_run

    async def run():
        running = engine.generate(prompts[0], sampling(backend, temperature=0, max_tokens=30, ignore_eos=True))
        await running.__anext__()
        newcomer = engine.generate(prompts[1], sampling(backend, temperature=0, max_tokens=3, ignore_eos=True))
        try:
            first = await asyncio.wait_for(newcomer.__anext__(), timeout=30)
            await asyncio.to_thread(held.wait, 30)
            assert held.is_set() and not release.is_set()  # the decode pass after it is still held
        finally:
            release.set()
        rest = [event async for event in newcomer]
        assert len([event async for event in running]) == 29
        await until_idle(engine, budget)
        return [first, *rest]

    try:
        assert len(asyncio.run(run())) == 3
    finally:
        engine.close()


def test_kv_budget_is_respected(backend, prompts):
    engine = engine_like(backend, kv_budget_tokens=200)
    try:
        s = sampling(backend, temperature=0, max_tokens=60, ignore_eos=True)  # ~40 prompt + 60 = ~100 tokens

        async def run():
            first = engine.generate(prompts[0], s)
            await first.__anext__()
            second = engine.generate(prompts[2], s)
            await second.__anext__()
            with pytest.raises(KVCacheFull):
                await engine.generate(prompts[3], s).__anext__()
            with pytest.raises(TooLargeForCache, match="lower max_tokens"):
                await engine.generate(prompts[0], sampling(backend, temperature=0, max_tokens=500)).__anext__()
            await first.aclose()
            await second.aclose()

        asyncio.run(run())
    finally:
        engine.close()


def conversation(backend, answer_ids: list[int] | None = None) -> list[int]:
    """A first turn long enough for its prefix to be reused (about 115 tokens), or with
    `answer_ids` the second turn after that answer."""
    builder = PromptBuilder(backend.tokenizer)
    first = ChatMessage(role="user", content="Tell me a story about a dragon and a knight who become friends. " * 6)
    if answer_ids is None:
        return builder.chat_ids([first])
    answer = backend.tokenizer.decode(answer_ids, skip_special_tokens=True)
    return builder.chat_ids([first, ChatMessage(role="assistant", content=answer),
                             ChatMessage(role="user", content="And then?")])


def test_a_next_turn_prefills_only_what_the_prefix_cache_lacks_and_answers_the_same(backend):
    s = sampling(backend, temperature=0, max_tokens=24, ignore_eos=True)
    cached, plain = engine_like(backend), engine_like(backend, prefix_cache=False)
    try:
        async def run():
            first = conversation(backend)
            answer = await tokens(cached, first, s)
            await until_idle(cached, cached.kv_budget_tokens)
            assert cached.prefix_cached_tokens == len(first) + len(answer) - 1  # all but the unfed last token
            second = conversation(backend, answer)
            return first, second, await tokens(cached, second, s), await tokens(plain, second, s)

        first, second, reused, recomputed = asyncio.run(run())
        assert reused == recomputed
        hits = cached._prefixes
        assert hits.hits == 1 and len(first) <= hits.reused_tokens < len(second)
        assert plain.prefix_cached_tokens == 0 and not plain.prefix_caching
    finally:
        cached.close()
        plain.close()


def test_a_prefix_that_cannot_be_kept_fails_no_request(backend, prompts, monkeypatch):
    engine = engine_like(backend)
    budget = engine.kv_budget_tokens
    long_run = sampling(backend, temperature=0, max_tokens=40, ignore_eos=True)

    offered = []

    def broken(tokens, *args, **kwargs):
        offered.append(len(tokens))
        raise MemoryError("no room for a copy")

    try:
        async def run():
            alone = await tokens(engine, prompts[5], long_run)
            await until_idle(engine, budget)  # kept (or not) by now
            held = engine.prefix_cached_tokens
            monkeypatch.setattr(engine._prefixes, "add", broken)
            # the first finishes (and is not kept) while the second still decodes in its batch
            together = await asyncio.gather(tokens(engine, conversation(backend), sampling(
                backend, temperature=0, max_tokens=8, ignore_eos=True)), tokens(engine, prompts[5], long_run))
            await until_idle(engine, budget)
            return alone, together, held

        alone, (first, second), held = asyncio.run(run())
        assert len(first) == 8 and second == alone
        assert len(conversation(backend)) + 7 in offered  # the first was offered, and the cache failed
        assert engine.prefix_cached_tokens == held  # nothing was added
    finally:
        engine.close()


def test_the_prefix_cache_keeps_to_its_own_bound(backend):
    kept = len(conversation(backend)) + 24 - 1  # the first turn, answered with 24 tokens
    for bound, held in [(kept - 1, 0), (kept, kept)]:
        engine = engine_like(backend, prefix_cache_tokens=bound)
        try:
            asyncio.run(tokens(engine, conversation(backend), sampling(backend, temperature=0, max_tokens=24,
                                                                        ignore_eos=True)))
            asyncio.run(until_idle(engine, engine.kv_budget_tokens))
            assert engine.prefix_cache_tokens == bound and engine.prefix_cached_tokens == held
        finally:
            engine.close()


def test_the_prefix_cache_is_on_by_default_and_off_with_its_flag(backend):
    from chatfabric.deploy.cli import build_parser

    kind = "slots" if isinstance(backend.engine, SlotEngine) else "padded"
    for flags, on in [([], True), (["--no-prefix-cache"], False)]:
        args = build_parser().parse_args(["worker", *flags])
        made = HFBackend(backend.model, backend.tokenizer, "cpu", engine=kind, kv_cache_tokens=1_000,
                         max_batch=2, prefix_cache=args.prefix_cache)
        try:
            assert made.engine.prefix_caching is on
        finally:
            made.engine.close()


def test_the_prefix_cache_gives_its_tokens_up_to_requests(backend, prompts):
    """Cached and reserved tokens never exceed the budget: a request that needs the cache's room
    evicts it, and a finished sequence is kept only in what reservations leave."""
    budget = 300
    engine = engine_like(backend, kv_budget_tokens=budget)
    try:
        async def run():
            first = conversation(backend)
            answer = await tokens(engine, first, sampling(backend, temperature=0, max_tokens=24, ignore_eos=True))
            await until_idle(engine, budget)
            held = engine.prefix_cached_tokens
            assert held == len(first) + len(answer) - 1 and engine.kv_free_tokens == budget
            big = sampling(backend, temperature=0, max_tokens=budget - len(prompts[0]) - held + 10, ignore_eos=True)
            stream = engine.generate(prompts[0], big)
            await stream.__anext__()
            assert engine.prefix_cached_tokens == 0  # it had to give way
            assert engine.prefix_cached_tokens + budget - engine.kv_free_tokens <= budget
            await stream.aclose()
            await until_idle(engine, budget)
            assert engine.prefix_cached_tokens == 0  # an aborted sequence is not kept

        asyncio.run(run())
    finally:
        engine.close()


def test_chunked_prefill_matches_and_lets_others_decode(backend, prompts):
    long_prompt = backend.tokenizer("The history of the Roman Empire. " * 120)["input_ids"]
    assert len(long_prompt) > 700
    s = sampling(backend, temperature=0, max_tokens=8, ignore_eos=True)
    whole = asyncio.run(tokens(backend.engine, long_prompt, s))
    engine = engine_like(backend, prefill_chunk=64)
    try:
        async def run():
            finished_order = []

            async def tracked(name, ids, samp):
                out = await tokens(engine, ids, samp)
                finished_order.append(name)
                return out

            short = asyncio.create_task(tracked("short", prompts[4], sampling(backend, temperature=0, max_tokens=6,
                                                                               ignore_eos=True)))
            await asyncio.sleep(0.3)  # the short request is decoding when the long prompt arrives
            chunked = await tracked("long", long_prompt, s)
            await short
            return chunked, finished_order

        chunked, order = asyncio.run(run())
    finally:
        engine.close()
    assert chunked == whole
    assert order == ["short", "long"]


def test_a_request_longer_than_a_slot_is_refused_with_the_limit(backend, prompts):
    if not isinstance(backend.engine, SlotEngine):
        pytest.skip("slots only: the padded engine has no per-row limit")
    engine = engine_like(backend, slot_length=64)
    try:
        async def run():
            with pytest.raises(TooLargeForCache, match="at most 64 per request"):
                await engine.generate(prompts[0], sampling(backend, temperature=0, max_tokens=60)).__anext__()
            return await tokens(engine, prompts[4], sampling(backend, temperature=0, max_tokens=8, ignore_eos=True))

        assert len(asyncio.run(run())) == 8
    finally:
        engine.close()


def test_extreme_sampling_values_give_tokens(backend, prompts):
    engine = backend.engine
    eos = min(backend.eos_token_ids)
    configs = [
        dict(temperature=1e-38), dict(temperature=1e-300), dict(temperature=5e-324),
        dict(temperature=1.0, top_p=1e-300, seed=1),
        dict(temperature=0.7, repetition_penalty=1e-300, seed=2),
        dict(temperature=0.7, repetition_penalty=1e300, top_k=10**9, seed=-2**63),
        dict(temperature=2.0, presence_penalty=-2.0, frequency_penalty=2.0, seed=2**63 - 1,
             logit_bias={0: 100.0, -1: -100.0, 2**40: 100.0, engine.vocab_size: 100.0}),
        dict(temperature=0.5, min_tokens=4, logit_bias={eos: 100.0}, seed=4),  # the bias pulls to a masked token
    ]

    # built as the worker's own Sampling: the values at the edges of what the request schema lets through
    samplings = [Sampling(max_tokens=4, stop_token_ids=backend.eos_token_ids if "min_tokens" in c else frozenset(),
                          ignore_eos="min_tokens" not in c, **c) for c in configs]

    async def run():
        budget = engine.kv_free_tokens
        outs = await asyncio.gather(*[tokens(engine, prompts[i % len(prompts)], s) for i, s in enumerate(samplings)])
        await until_idle(engine, budget)
        return outs

    for out in asyncio.run(run()):
        assert len(out) == 4 and all(0 <= t < engine.vocab_size for t in out)


POISON_SEEDS = {666: 0, 667: 2}  # seed: the output token at which that request's sampling fails


def test_a_sequence_whose_sampling_fails_fails_alone(backend, prompts, monkeypatch):
    engine = backend.engine
    real_pick = engine_module.pick_token

    def pick_token(logits, s, seen, counts, generated, generator):
        if POISON_SEEDS.get(s.seed) == generated:
            raise RuntimeError("poisoned sampling")
        return real_pick(logits, s, seen, counts, generated, generator)

    monkeypatch.setattr(engine_module, "pick_token", pick_token)
    greedy = sampling(backend, temperature=0, max_tokens=8, ignore_eos=True)

    async def poisoned(seed, prompt):
        with pytest.raises(RuntimeError, match="poisoned sampling"):
            await tokens(engine, prompt, sampling(backend, temperature=0.8, seed=seed, max_tokens=4, ignore_eos=True))

    async def run():
        solo = await tokens(engine, prompts[0], greedy)
        budget = engine.kv_free_tokens
        stream = engine.generate(prompts[0], greedy)
        first = await stream.__anext__()

        async def rest():
            return [first.token_id] + [e.token_id async for e in stream]

        ran, *_ = await asyncio.gather(rest(), *[poisoned(seed, prompts[i + 1]) for i, seed in enumerate(POISON_SEEDS)])
        await until_idle(engine, budget)
        after = await tokens(engine, prompts[3], sampling(backend, temperature=0, max_tokens=4, ignore_eos=True))
        return solo, ran, after

    solo, ran, after = asyncio.run(run())
    assert ran == solo
    assert len(after) == 4


class Poisoned:
    """The model, failing every forward pass whose input holds token `MARK`, and the next decode
    pass (one token per row) once `fail_decode` is set."""

    MARK = 49151  # a rare token: no test prompt holds it and no greedy output below reaches it

    def __init__(self, model):
        self.model = model
        self.fail_decode = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *, input_ids, **kwargs):
        if (input_ids == self.MARK).any():
            raise RuntimeError("poisoned prompt")
        if self.fail_decode and input_ids.shape[1] == 1:
            self.fail_decode = False
            raise RuntimeError("poisoned decode")
        return self.model(input_ids=input_ids, **kwargs)


def test_a_failing_prefill_fails_only_its_prompts(backend, prompts):
    model = Poisoned(backend.model)
    # a short chunk: the long poisoned prompt is prefilled in chunks (and, in slots, holds a row)
    engine = engine_like(backend, model=model, slot_length=256, prefill_chunk=16)
    greedy = sampling(backend, temperature=0, max_tokens=8, ignore_eos=True)
    short, long = [Poisoned.MARK] * 3, prompts[1] + [Poisoned.MARK]
    assert len(long) > 16 and all(Poisoned.MARK not in p for p in prompts)
    try:
        async def poisoned(prompt):
            with pytest.raises(RuntimeError, match="poisoned prompt"):
                await tokens(engine, prompt, greedy)

        async def run():
            solo = await tokens(engine, prompts[4], greedy)
            budget = engine.kv_free_tokens
            stream = engine.generate(prompts[4], greedy)
            first = await stream.__anext__()

            async def rest():
                return [first.token_id] + [e.token_id async for e in stream]

            ran, *_ = await asyncio.gather(rest(), poisoned(short), poisoned(long))
            await until_idle(engine, budget)
            return solo, ran, await tokens(engine, prompts[3], greedy)

        solo, ran, after = asyncio.run(run())
    finally:
        engine.close()
    assert Poisoned.MARK not in solo
    assert ran == solo
    assert len(after) == 8


def test_a_failing_decode_fails_its_batch_and_the_engine_goes_on(backend, prompts):
    model = Poisoned(backend.model)
    engine = engine_like(backend, model=model, slot_length=256)
    short = sampling(backend, temperature=0, max_tokens=4, ignore_eos=True)
    try:
        async def run():
            before = await tokens(engine, prompts[3], short)
            budget = engine.kv_free_tokens
            running = [engine.generate(p, sampling(backend, temperature=0, max_tokens=60, ignore_eos=True))
                       for p in prompts[:2]]
            for stream in running:
                await stream.__anext__()
            model.fail_decode = True
            for stream in running:
                with pytest.raises(RuntimeError, match="poisoned decode"):
                    async for _ in stream:
                        pass
            await until_idle(engine, budget)
            return before, await tokens(engine, prompts[3], short)

        before, after = asyncio.run(run())
    finally:
        engine.close()
    assert after == before


def test_a_failure_while_joining_the_batch_returns_every_reservation(backend, prompts, monkeypatch):
    engine = backend.engine
    poison = list(prompts[2])
    real_start = engine._start

    def start(seq):
        if seq.prompt_ids == poison:
            raise RuntimeError("poisoned join")
        real_start(seq)

    monkeypatch.setattr(engine, "_start", start)

    async def rest(stream):
        return [e.token_id async for e in stream]

    async def run():
        budget = engine.kv_free_tokens
        stream = engine.generate(prompts[0], sampling(backend, temperature=0, max_tokens=12, ignore_eos=True))
        await stream.__anext__()  # running before the poisoned request arrives
        running = asyncio.create_task(rest(stream))
        with pytest.raises(RuntimeError, match="poisoned join"):
            await tokens(engine, poison, sampling(backend, temperature=0, max_tokens=8, ignore_eos=True))
        ran = (await asyncio.gather(running, return_exceptions=True))[0]
        await until_idle(engine, budget)
        return ran, await tokens(engine, prompts[3], sampling(backend, temperature=0, max_tokens=4, ignore_eos=True))

    ran, after = asyncio.run(run())
    if isinstance(engine, SlotEngine):
        assert len(ran) == 11  # a slot row is its own: the running sequence never notices
    elif isinstance(ran, Exception):
        assert "poisoned join" in str(ran)  # joining re-lays the shared cache: the batch fails with it
    assert len(after) == 4


def test_closing_the_engine_fails_its_requests_and_returns_their_cache(backend, prompts):
    engine = engine_like(backend, slot_length=256)

    async def run():
        budget = engine.kv_free_tokens
        stream = engine.generate(prompts[0], sampling(backend, temperature=0, max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(engine.close)
        with pytest.raises(RuntimeError, match="closed"):
            async for _ in stream:
                pass
        await until_idle(engine, budget)

    asyncio.run(run())


def test_worker_flags_are_validated():
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "chatfabric")
    for flags, message in [(["--slot-length", "1"], "--slot-length must be at least 2"),
                           (["--max-model-len", "1"], "--max-model-len must be at least 2"),
                           (["--max-model-len", "9000"], "between 2 and the model's context length 8192, not 9000"),
                           (["--engine", "static"], "invalid choice: 'static'")]:
        done = subprocess.run([cli, "worker", *flags], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr


def test_engine_benchmark_tool(tmp_path, capsys):
    import json

    from chatfabric.bench import engine as engine_bench

    out = tmp_path / "engines.jsonl"
    engine_bench.main(["--model-config", "tiny", "--device", "cpu", "--concurrency", "1,3", "--input-len", "8",
                       "--output-len", "4", "--ttft-probe", "3", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # slots-graphs needs CUDA: skipped on CPU, and said so
    assert "slots-graphs skipped" in capsys.readouterr().out
    assert [(r["engine"], r["concurrency"]) for r in rows] == [
        (e, c) for c in (1, 3) for e in ("generate", "padded", "slots")]
    for row in rows:
        assert row["output_tokens_per_s"] > 0 and row["ms_per_step"] > 0
        assert (row["ttft_ms_p50"] is None) == (row["engine"] == "generate")
        assert row["engine"] == "generate" or row["probe_ttft_ms_max"] >= row["probe_ttft_ms_p50"] > 0
    with pytest.raises(SystemExit):
        engine_bench.main(["--model-config", "tiny", "--engines", "bogus"])
