"""The engines on CUDA (skipped without a GPU): the slot engine's CUDA graphs give the tokens
that eager transformers gives, batched or alone, and free their rows.

The model is a small Llama with random weights (no download needed on a GPU host); its weights
are drawn wide so that its next-token distributions are peaked and greedy decoding does not hinge
on float rounding between batch shapes. fp32 without TF32 for the same reason."""

from __future__ import annotations

import asyncio

import pytest
import torch

from chatfabric.worker.backend import Sampling
from chatfabric.worker.engine import BatchEngine
from chatfabric.worker.slots import SlotEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VOCAB = 512
SLOT_LENGTH = 700


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=2048,
                         initializer_range=0.2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(config).eval()
    m.generation_config.eos_token_id = None  # the engines run with ignore_eos: generate() must not stop either
    return m


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 17, 3, 40, 11, 64, 9, 23]
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def make(model, kind: str, **overrides):
    args = dict(vocab_size=VOCAB, device="cuda", max_batch=8, kv_budget_tokens=8 * SLOT_LENGTH, prefill_chunk=64)
    args.update(overrides)
    if kind == "padded":
        return BatchEngine(model, **args)
    return SlotEngine(model, slot_length=SLOT_LENGTH, cuda_graphs=kind == "graphs", **args)


def greedy(n: int) -> Sampling:
    return Sampling(max_tokens=n, temperature=0.0, ignore_eos=True)


async def collect(engine, ids, sampling, delay=0.0):
    await asyncio.sleep(delay)
    return [e.token_id async for e in engine.generate(ids, sampling)]


def reference(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["graphs", "slots", "padded"])
def test_batched_greedy_equals_transformers_generate(model, prompts, kind):
    engine = make(model, kind)
    try:
        async def run():
            solo = [await collect(engine, p, greedy(30)) for p in prompts[:3]]
            # staggered arrivals: joins while others decode, across graph batch buckets
            together = await asyncio.gather(*[collect(engine, p, greedy(30), 0.02 * i) for i, p in enumerate(prompts)])
            return solo, together

        solo, together = asyncio.run(run())
        expected = [reference(model, p, 30) for p in prompts]
        assert solo == expected[:3]
        assert together == expected
        if kind == "graphs":
            assert engine.graph_replays == engine.steps > 0
            # every batch size was captured at start, at the shortest attention length
            assert {(size, engine._lengths[0]) for size in engine._batch_sizes} <= set(engine._graphs)
    finally:
        engine.close()


def test_seeded_sampling_is_the_same_alone_and_batched(model, prompts):
    engine = make(model, "graphs")
    configs = [Sampling(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
               Sampling(max_tokens=20, temperature=1.0, top_k=10, seed=8, ignore_eos=True),
               Sampling(max_tokens=20, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
               Sampling(max_tokens=20, temperature=0.7, presence_penalty=1.0, seed=9, ignore_eos=True)]
    try:
        async def run():
            solo = [await collect(engine, p, s) for p, s in zip(prompts, configs)]
            together = await asyncio.gather(*[collect(engine, p, s) for p, s in zip(prompts, configs)])
            return solo, together

        solo, together = asyncio.run(run())
        assert together == solo
    finally:
        engine.close()


def test_long_prompt_in_chunks_and_cancellation_free_rows(model, prompts):
    engine = make(model, "graphs", prefill_chunk=32)
    long_prompt = (prompts[5] * 8)[:500]
    try:
        async def run():
            whole = reference(model, long_prompt, 10)
            budget = engine.kv_free_tokens
            endless = engine.generate(prompts[1], greedy(600))
            first = [await endless.__anext__() for _ in range(3)]
            chunked = await collect(engine, long_prompt, greedy(10))
            await endless.aclose()  # what a cancelled request does
            for _ in range(200):
                if not engine.rows and engine.kv_free_tokens == budget:
                    break
                await asyncio.sleep(0.01)
            return whole, chunked, first, budget

        whole, chunked, first, budget = asyncio.run(run())
        assert chunked == whole
        assert len(first) == 3
        assert engine.rows == [] and engine.kv_free_tokens == budget
    finally:
        engine.close()
