"""Pure pieces against hand-computed values: subject mapping, messages, text streaming,
sampling, prompt templates, the model cache and the embedded server."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chatfabric.proto import subjects
from chatfabric.proto.bus import BusConfig, connect
from chatfabric.proto.embedded import EmbeddedServer, free_port, port_is_free
from chatfabric.proto.messages import (
    ChatMessage,
    GenerationRequest,
    MessageError,
    SamplingParams,
    WorkerCard,
    decode,
    decode_chunks,
    encode,
)
from chatfabric.models import default_model
from chatfabric.worker.backend import Sampling
from chatfabric.worker.prompting import PromptBuilder, PromptError, render_llama2, render_vicuna
from chatfabric.worker.sampling import (
    apply_presence_frequency,
    apply_repetition_penalty,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)
from chatfabric.worker.params import resolve_sampling
from chatfabric.worker.textstream import IncrementalDetokenizer, StopMatcher

# -- subjects ---------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=300))
def test_model_token_round_trips_and_is_a_valid_token(name):
    try:
        subjects.check_model_name(name)
    except ValueError:
        with pytest.raises(ValueError):
            subjects.model_token(name)
        return
    token = subjects.model_token(name)
    assert subjects.model_from_token(token) == name
    assert all(c.isascii() and (c.isalnum() or c in "_-=") for c in token)
    assert len(subjects.gen_consumer(name)) <= 255  # JetStream's name limit


def test_model_names_are_bounded_before_any_subject_is_built():
    assert subjects.model_token("a" * 240) == "a" * 240
    for bad in ("a" * 241, "x" * 5000, "é" * 41, "a\ud800", ""):
        with pytest.raises(ValueError):
            subjects.gen_subject(bad)
    with pytest.raises(ValueError, match="at most 256 characters"):
        subjects.check_model_name("m" * 257)


def test_model_token_examples():
    assert subjects.model_token("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert subjects.model_token("org/m v1.5") == "org=2Fm=20v1=2E5"
    assert subjects.gen_subject("a.b") == "gen.a=2Eb"
    assert subjects.model_from_token(subjects.model_token("a=3Db")) == "a=3Db"
    with pytest.raises(ValueError):
        subjects.model_from_token("bad.token")
    with pytest.raises(ValueError):
        subjects.model_token("")


# -- messages ---------------------------------------------------------------------------------


def test_request_needs_exactly_one_input():
    base = dict(request_id="r1", model="m", reply_to="_INBOX.x", deadline=1.0)
    with pytest.raises(ValueError):
        GenerationRequest(**base)
    with pytest.raises(ValueError):
        GenerationRequest(**base, prompt="a", messages=(ChatMessage(role="user", content="b"),))
    req = GenerationRequest(**base, prompt=(1, 2, 3))
    assert decode(GenerationRequest, encode(req)) == req


def test_decode_explains_what_is_wrong():
    with pytest.raises(MessageError, match="sampling.temperature"):
        decode(GenerationRequest, json.dumps({"request_id": "r", "model": "m", "reply_to": "x", "deadline": 1,
                                              "prompt": "p", "sampling": {"temperature": 5}}).encode())
    with pytest.raises(MessageError, match="not valid|Invalid JSON|invalid"):
        decode(GenerationRequest, b"{nope")
    with pytest.raises(MessageError, match=r"\$\.v"):
        decode_chunks(json.dumps({"v": 9, "chunks": [["delta", "r", 0, "w", 1, "", 0]]}).encode())
    with pytest.raises(MessageError, match=r"'nope' - at `\$\.chunks\[0\]\[0\]`"):
        decode_chunks(json.dumps({"v": 1, "chunks": [["nope", "r", 0, "w", 1]]}).encode())
    with pytest.raises(MessageError, match=r">= 0 - at `\$\.chunks\[0\]\[2\]`"):
        decode_chunks(json.dumps({"v": 1, "chunks": [["delta", "r", -1, "w", 1, "", 0]]}).encode())
    with pytest.raises(MessageError, match="invalid chunk batch"):
        decode_chunks(b'{"v": 1, "chunks": [["delta", "r", 0, "w", 1, "\\ud800", 1]]}')  # no lone surrogates


def test_worker_card_liveness():
    card = WorkerCard(worker_id="w", models=(), backend="hf", device="cpu", capacity=1, in_flight=0,
                      version="0", host="h", pid=1, started_at=0.0, updated_at=100.0, ttl=5.0)
    assert card.alive(now=104.0) and not card.alive(now=106.0)


def test_bus_config_from_env(monkeypatch):
    monkeypatch.setenv("CHATFABRIC_ACK_WAIT", "2.5")
    monkeypatch.setenv("NATS_URL", "nats://example:4222")
    config = BusConfig.from_env()
    assert config.ack_wait == 2.5 and config.url == "nats://example:4222"
    monkeypatch.setenv("CHATFABRIC_QUEUE_LIMIT", "many")
    with pytest.raises(ValueError, match="CHATFABRIC_QUEUE_LIMIT"):
        BusConfig.from_env()
    with pytest.raises(ValueError):
        BusConfig(ack_wait=0)


# -- text streaming ---------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, pieces: list[str]) -> list[str]:
    return [matcher.feed(p) for p in pieces] + [matcher.flush()]


def test_stop_matcher_cuts_and_holds_back():
    m = StopMatcher(["STOP"])
    assert feed_all(m, ["hello ", "ST", "O", "P more"]) == ["hello ", "", "", "", ""]
    assert m.stopped


def test_stop_matcher_releases_false_alarms():
    m = StopMatcher(["STOP"])
    assert feed_all(m, ["a ST", "ART", " end"]) == ["a ", "START", " end", ""]
    assert not m.stopped
    m = StopMatcher(["ab", "xyz"])
    assert feed_all(m, ["x", "y", "ab"]) == ["", "", "xy", ""]  # 'ab' found after 'xy' was held
    m = StopMatcher(["END"])
    assert feed_all(m, ["the E"]) == ["the ", "E"]  # flushed at the end of the generation


def test_stop_matcher_earliest_stop_wins():
    assert StopMatcher(["c", "ab"]).feed("xabc") == "x"


def test_detokenizer_never_splits_characters(tokenizer):
    text = "café 🎉 世界 — ünïcödé 🎉🎉 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Hi:", add_special_tokens=False)["input_ids"])
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # some tokens were held until their character completed


# -- sampling ---------------------------------------------------------------------------------


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]


def test_presence_and_frequency_hand_computed():
    logits = torch.tensor([1.0, 1.0, 1.0])
    apply_presence_frequency(logits, torch.tensor([0, 1, 3]), presence=0.5, frequency=0.25)
    assert logits.tolist() == pytest.approx([1.0, 0.25, -0.25])


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [False, False, True, True]
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [False, False, True, True]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [False, False, False, True]
    assert torch.isinf(top_p_filter(logits, 0.1)).tolist() == [False, True, True, True]


def test_min_tokens_masks_stop_tokens_and_bias_applies():
    s = Sampling(max_tokens=5, temperature=0.0, min_tokens=2, stop_token_ids=frozenset({0}), logit_bias={2: 5.0})
    logits = torch.tensor([9.0, 1.0, 0.0])
    out = process_logits(logits.clone(), s, torch.tensor([], dtype=torch.long), torch.zeros(3), generated=0)
    assert sample(out, s, None) == 2  # token 0 masked, token 2 biased above token 1
    out = process_logits(logits.clone(), s, torch.tensor([], dtype=torch.long), torch.zeros(3), generated=2)
    assert sample(out, s, None) == 0


def test_seeded_sampling_is_reproducible():
    s = Sampling(max_tokens=1, temperature=1.0, seed=3)
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    draws = lambda: [sample(logits.clone(), s, g) for g in [torch.Generator().manual_seed(3)] for _ in range(20)]
    assert draws() == draws()


def test_resolve_defaults_and_clamps():
    s = resolve_sampling(SamplingParams(max_tokens=500, stop_token_ids=(7,)), room=100, eos_token_ids=frozenset({2}),
                defaults={"temperature": 0.6})
    assert s.max_tokens == 100 and s.temperature == 0.6 and s.top_p == 1.0
    assert s.stop_token_ids == frozenset({2, 7})
    s = resolve_sampling(SamplingParams(temperature=0, ignore_eos=True, top_k=-1), room=10, eos_token_ids=frozenset({2}),
                defaults={})
    assert s.max_tokens == 10 and s.greedy and s.stop_token_ids == frozenset() and s.top_k == 0


# -- prompting --------------------------------------------------------------------------------


MSGS = (ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"), ChatMessage(role="user", content="Bye"))


def test_fallback_templates():
    assert render_vicuna(MSGS, "<s>", "</s>") == "<s>Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT:"
    assert render_llama2(MSGS, "<s>", "</s>") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"
    )


def test_prompt_builder_uses_the_model_template(tokenizer):
    builder = PromptBuilder(tokenizer)
    ids = builder.chat_ids(MSGS[1:2])
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                             tokenize=False)
    assert tokenizer.decode(ids) == expected
    chatml = PromptBuilder(tokenizer, "chatml").chat_ids(MSGS[1:2])
    assert tokenizer.decode(chatml) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="unknown conversation template"):
        PromptBuilder(tokenizer, "nope")


@pytest.fixture(scope="module")
def bos_lowercase_tokenizer(tokenizer):
    """SmolLM2's tokenizer with a post-processor that adds a start token and a lowercasing
    normalizer: where the special-tokens flag and normalizing change the ids."""
    import copy

    from tokenizers import normalizers, processors

    changed = copy.deepcopy(tokenizer)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    changed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", start)])
    changed.backend_tokenizer.normalizer = normalizers.Lowercase()
    return changed


@given(st.text(max_size=200))
def test_prompt_builder_encodes_as_the_tokenizer_does(tokenizer, bos_lowercase_tokenizer, text):
    """The Rust tokenizer called directly gives the tokenizer's own ids, with special tokens or
    without, through a post-processor and a normalizer."""
    for tok in (tokenizer, bos_lowercase_tokenizer):
        builder = PromptBuilder(tok)
        assert builder._backend is not None
        for special in (True, False):
            assert builder.encode(text, add_special_tokens=special) == tok(text, add_special_tokens=special)["input_ids"]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert PromptBuilder(bos_lowercase_tokenizer).encode(text, add_special_tokens=True)[0] == start
    assert PromptBuilder(tokenizer).encode(text + "<|im_end|>", add_special_tokens=False)[-1] == \
        tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_prompt_builder_leaves_to_the_tokenizer_what_its_wrapper_changes(tokenizer):
    """A class that encodes in its own way (CodeLlama's infilling) is called as it is, and so is
    a Rust tokenizer left truncating (the wrapper turns that off per call)."""
    import copy

    class Infilling(type(tokenizer)):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    infilling = copy.deepcopy(tokenizer)
    infilling.__class__ = Infilling
    assert PromptBuilder(infilling)._backend is None
    truncating = copy.deepcopy(tokenizer)
    builder = PromptBuilder(truncating)
    truncating.backend_tokenizer.enable_truncation(4)  # after the builder was made: checked per call
    long = "one two three four five six seven eight"
    assert builder.encode(long, add_special_tokens=True) == tokenizer(long)["input_ids"]
    assert len(builder.encode(long, add_special_tokens=True)) > 4


def test_prompt_builder_without_template_refuses_chat(tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(PromptError, match="--conv-template"):
        PromptBuilder(NoTemplate()).chat_ids(MSGS)


# -- the default model cache ------------------------------------------------------------------


def test_model_cache_converts_once_and_redoes_half_written(tmp_path, monkeypatch):
    conversions = []

    def fake_convert(source: Path, out: Path) -> None:  # the real conversion runs in the session fixture
        conversions.append(source)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    target = default_model.ensure_default_model(tmp_path)
    assert default_model.is_complete(target) and len(conversions) == 1
    assert default_model.ensure_default_model(tmp_path) == target and len(conversions) == 1
    # an interrupted run: the folder is there without its marker
    (target / default_model.MARKER).unlink()
    (target / "model.safetensors").write_bytes(b"truncated")
    assert default_model.ensure_default_model(tmp_path) == target
    assert len(conversions) == 2 and not (target / "model.safetensors").exists()


def test_real_default_model_cache_is_complete(model_dir):
    assert default_model.is_complete(model_dir)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())


def test_cache_root_override(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFABRIC_MODEL_CACHE", str(tmp_path))
    assert default_model.cache_root() == tmp_path


# -- the embedded server ----------------------------------------------------------------------


def test_embedded_server_starts_with_jetstream_and_stops(tmp_path):
    server = EmbeddedServer(port=free_port(), store_dir=tmp_path / "store").start()
    try:
        async def use():
            async with connect(BusConfig(url=server.url), name="test") as bus:
                info = await bus.js.account_info()
                assert bus.nc.max_payload == 8 * 1024 * 1024
                return info

        assert asyncio.run(use()) is not None
        assert (tmp_path / "store" / "jetstream").is_dir()
    finally:
        server.stop()
    assert not server.running
    assert port_is_free("127.0.0.1", server.port)


def test_embedded_server_avoids_a_busy_4222():
    blocker = socket.socket()
    try:
        if port_is_free("127.0.0.1", 4222):
            blocker.bind(("127.0.0.1", 4222))
            blocker.listen()
        with EmbeddedServer() as server:
            assert server.port != 4222
            assert server.running
    finally:
        blocker.close()


def test_a_connection_closed_for_good_stops_the_process(tmp_path):
    """nats-server drops a client that sends a control line over 4 KiB, and the client library
    does not reconnect after that: the process must stop (to be restarted), not limp on."""
    from chatfabric.proto.bus import BusLost

    async def run(server):
        stop = asyncio.Event()
        with pytest.raises(BusLost, match="[Cc]ontrol [Ll]ine"):
            async with connect(BusConfig(url=server.url), "test", stop) as bus:
                await bus.nc.publish("x." + "a" * 5000, b"")  # what an unchecked model name once did
                await asyncio.wait_for(stop.wait(), 10)
        assert stop.is_set()

    with EmbeddedServer(port=free_port(), store_dir=tmp_path / "store") as server:
        asyncio.run(run(server))


def test_connect_without_url_embeds_and_cleans_up(monkeypatch):
    monkeypatch.delenv("NATS_URL", raising=False)

    async def run():
        async with connect(BusConfig(), name="test") as bus:
            url = bus.nc.connected_url
            await bus.js.stream_info(subjects.GEN_STREAM)
            return url.port

    port = asyncio.run(run())
    assert port_is_free("127.0.0.1", port)


def test_grouped_sdpa_matches_transformers_sdpa_with_a_padding_mask():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatfabric.worker.attention import NAME, use_grouped_sdpa

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding: every batched step has a mask like this
    with torch.inference_mode():
        stock = model(input_ids=ids, attention_mask=mask).logits
        assert use_grouped_sdpa(model) and model.config._attn_implementation == NAME
        grouped = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(stock, grouped, atol=1e-5)
    assert not use_grouped_sdpa(LlamaForCausalLM(LlamaConfig(  # no grouped-query attention: left as is
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=100, attn_implementation="sdpa")))


def test_a_tokenizer_larger_than_the_models_embeddings_is_refused_at_load(tokenizer):
    """Otherwise its higher token ids fail every request that holds one, as an internal error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatfabric.worker.hf import HFBackend

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)).eval()
    with pytest.raises(ValueError, match=f"the tokenizer has {len(tokenizer)} tokens but the model embeds only 1024"):
        HFBackend(model, tokenizer, "cpu", kv_cache_tokens=256)


def test_the_event_loop_is_uvloop_unless_asked_otherwise(monkeypatch):
    import sys

    import uvloop

    from chatfabric.deploy.cli import event_loop_factory

    monkeypatch.delenv("CHATFABRIC_LOOP", raising=False)
    assert event_loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("CHATFABRIC_LOOP", "uvloop")
    assert event_loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("CHATFABRIC_LOOP", "asyncio")
    assert event_loop_factory() is None
    monkeypatch.setenv("CHATFABRIC_LOOP", "uv-loop")
    with pytest.raises(ValueError, match="give one of uvloop, asyncio"):
        event_loop_factory()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed
    monkeypatch.setenv("CHATFABRIC_LOOP", "uvloop")
    with pytest.raises(ValueError, match="uvloop is not installed"):
        event_loop_factory()
    monkeypatch.delenv("CHATFABRIC_LOOP")
    assert event_loop_factory() is None  # the standard loop where uvloop does not build


# -- the prefix cache --------------------------------------------------------------------------------


def _kv(tokens) -> list:
    """One layer whose keys and values hold each token id at its position: what a slice reads back
    shows which tokens' KV it is."""
    t = torch.tensor(tokens, dtype=torch.float32).view(1, 1, -1, 1)
    return [(t, t.clone())]


@given(st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=12), max_size=8),
       st.lists(st.integers(0, 3), min_size=0, max_size=14), st.integers(0, 40), st.integers(1, 4))
def test_the_prefix_cache_reuses_the_longest_common_prefix_within_its_room(sequences, prompt, room, min_tokens):
    from chatfabric.worker.prefix_cache import PrefixCache

    cache = PrefixCache(min_tokens)
    for tokens in sequences:
        kept = cache.add(tokens, _kv(tokens), room)
        assert kept == (min_tokens <= len(tokens) <= room)
        assert cache.tokens <= room
    held = list(cache._entries)
    assert cache.tokens == sum(map(len, held))
    assert not any(a != b and b[:len(a)] == a for a in held for b in held)  # an extended entry is dropped

    def common(a):
        n = 0
        while n < min(len(a), len(prompt) - 1) and a[n] == prompt[n]:
            n += 1
        return n

    best = max((common(a) for a in held), default=0)
    hit = cache.match(prompt)
    if best < min_tokens:
        assert hit is None
    else:
        length, layers = hit
        assert length == best < len(prompt)
        assert layers[0][0][0, 0, :length, 0].tolist() == [float(t) for t in prompt[:length]]
        assert cache.hits == 1 and cache.reused_tokens == length
    cache.evict_to(room // 2)
    assert cache.tokens <= room // 2 and cache.tokens == sum(map(len, cache._entries))
    indexed = [key for keys in cache._by_head.values() for key in keys]
    assert sorted(indexed) == sorted(cache._entries) and all(cache._by_head.values())


def test_the_prefix_cache_evicts_the_least_recently_used_first():
    from chatfabric.worker.prefix_cache import PrefixCache

    cache = PrefixCache(2)
    for tokens in ([1, 1, 1], [2, 2, 2], [3, 3, 3]):
        cache.add(tokens, _kv(tokens), room=9)
    assert cache.match([1, 1, 1, 9]) is not None  # [1, 1, 1] is the most recently used now
    cache.add([4, 4, 4], _kv([4, 4, 4]), room=9)  # one must go: the least recently used, [2, 2, 2]
    assert sorted(cache._entries) == [(1, 1, 1), (3, 3, 3), (4, 4, 4)]
    with pytest.raises(ValueError):
        PrefixCache(0)


def test_the_vllm_backend_asks_for_prefix_caching_unless_told_otherwise(tmp_path):
    from chatfabric.worker.cli import parse_vllm_args
    from chatfabric.worker.vllm_backend import engine_args

    common = dict(dtype="float32", tensor_parallel_size=1, max_model_len=None, max_num_seqs=4,
                  gpu_memory_utilization=None)
    assert engine_args(tmp_path, extra={}, **common)["enable_prefix_caching"] is True
    off = engine_args(tmp_path, extra=parse_vllm_args(["enable_prefix_caching=false"]), **common)
    assert off["enable_prefix_caching"] is False
