"""The Hugging Face transformers backend (CPU and CUDA): model loading, device and dtype choice,
the KV cache budget, and the continuous-batching engine that runs it (`engine.py`)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from pathlib import Path
from typing import AsyncIterator

import torch
from transformers import DynamicCache

from .attention import use_grouped_sdpa
from .backend import Sampling, TokenEvent
from .engine import BatchEngine
from .slots import SlotEngine

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return requested


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device == "cpu":
        return torch.float32  # CPUs without native bf16 run fp32 faster
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def context_length_of(config) -> int:
    for name in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's context length from its config")


def served_context(config, max_model_len: int | None) -> int:
    """The context a worker serves: the model's, or a shorter `max_model_len`."""
    model_context = context_length_of(config)
    if max_model_len is None:
        return model_context
    if not 2 <= max_model_len <= model_context:
        raise ValueError(f"--max-model-len must be between 2 and the model's context length {model_context}, "
                         f"not {max_model_len}")
    return max_model_len


def check_vocabulary(tokenizer, model) -> None:
    """A tokenizer that gives ids past the model's embeddings does not belong to it: ValueError."""
    embedded = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedded:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {embedded}: "
                         "they do not belong together")


def generation_defaults_of(model) -> dict:
    """The sampling defaults a model ships in its generation config, in our parameter names."""
    gen = getattr(model, "generation_config", None)
    if gen is None or not getattr(gen, "do_sample", False):
        return {}
    names = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {n: getattr(gen, n) for n in names if getattr(gen, n, None) is not None}


def eos_ids_of(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def default_kv_budget(config, dtype: torch.dtype, device: str) -> int:
    """KV tokens that fit in a share of the memory free now: 70% of free GPU memory, or a
    quarter of the available RAM on CPU (the rest is for activations and everything else)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        usable = int(free * 0.7)
    else:
        usable = available_ram() // 4
    return max(usable // kv_bytes_per_token(config, dtype), 1024)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3


class HFBackend:
    """Hugging Face transformers behind the continuous-batching engine (`engine.py`)."""

    kind = "hf"

    def __init__(self, model, tokenizer, device: str, *, max_batch: int = 16,
                 kv_cache_tokens: int | None = None, prefill_chunk: int = 512, engine: str = "auto",
                 slot_length: int | None = None, cuda_graphs: bool | None = None, max_model_len: int | None = None,
                 prefix_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = served_context(model.config, max_model_len)
        check_vocabulary(tokenizer, model)
        self.eos_token_ids = eos_ids_of(model, tokenizer)
        self.generation_defaults = generation_defaults_of(model)
        if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers):
            raise ValueError("models with sliding-window attention are not supported by the transformers "
                             "backend's batching engine yet")
        # transformers 5.x renamed `past_key_values` to `cache`; accept either release.
        params = inspect.signature(model.forward).parameters
        budget = kv_cache_tokens or default_kv_budget(model.config, model.dtype, device)
        if engine == "auto":
            engine = "slots" if device.startswith("cuda") else "padded"
        common = dict(
            vocab_size=model.get_output_embeddings().weight.shape[0],
            device=device,
            max_batch=max_batch,
            kv_budget_tokens=budget,
            prefill_chunk=prefill_chunk,
            cache_arg="cache" if "cache" in params else "past_key_values",
        )
        if slot_length is not None and not 2 <= slot_length <= self.context_length:
            raise ValueError(f"slot length must be between 2 and the context served, {self.context_length}")
        if engine == "slots":
            # each row holds a whole request: the context length, or the budget's share per row
            slot_length = slot_length or min(self.context_length, max(budget // max_batch, 2))
            # its prefix cache lives in host memory: at most what a CPU's KV budget would be
            self.engine = SlotEngine(model, slot_length=slot_length, cuda_graphs=cuda_graphs, prefix_cache=prefix_cache,
                                     prefix_cache_tokens=default_kv_budget(model.config, model.dtype, "cpu"), **common)
        elif engine == "padded":
            if cuda_graphs:
                raise ValueError("CUDA graphs need the slots engine (--engine slots)")
            self.engine = BatchEngine(model, prefix_cache=prefix_cache, **common)
        else:
            raise ValueError(f"unknown engine {engine!r}: choose auto, padded or slots")
        log.info("%s engine; KV cache budget: %d tokens, batch up to %d%s", engine, budget, max_batch,
                 ", prefix caching" if self.engine.prefix_caching else "")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", **engine_args) -> "HFBackend":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        config = AutoConfig.from_pretrained(str(path))
        served_context(config, engine_args.get("max_model_len"))  # refused before the weights load
        device = pick_device(device)
        torch_dtype = pick_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch_dtype)
        model.to(device).eval()
        use_grouped_sdpa(model)
        log.info("loaded %s on %s as %s", path, device, torch_dtype)
        return cls(model, tokenizer, device, **engine_args)

    @property
    def kv_free_tokens(self) -> int:
        return self.engine.kv_free_tokens

    @property
    def kv_cache_tokens(self) -> int:
        """The whole KV budget: with nothing running, `kv_free_tokens` equals it."""
        return self.engine.kv_budget_tokens

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[TokenEvent]:
        return self.engine.generate(prompt_ids, sampling)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)
