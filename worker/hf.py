"""The Hugging Face transformers backend (CPU and CUDA).

Every forward pass runs on one dedicated compute thread, so the event loop only moves messages.
Each sequence keeps its own KV cache; concurrent requests take turns on the compute thread one
step at a time, so a new request starts without waiting for the others to finish.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import torch

from .backend import Sampling, TokenEvent
from .sampling import make_generator, process_logits, sample

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


@dataclass
class _Sequence:
    prompt_ids: list[int]
    sampling: Sampling
    generator: torch.Generator
    seen: torch.Tensor
    output_counts: torch.Tensor
    cache: object = None
    last_token: int | None = None
    generated: int = 0


class HFBackend:
    kind = "hf"

    def __init__(self, model, tokenizer, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length_of(model.config)
        self.eos_token_ids = eos_ids_of(model, tokenizer)
        self.generation_defaults = generation_defaults_of(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # transformers 5.x renamed `past_key_values` to `cache`; accept either release.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-compute")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto") -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        device = pick_device(device)
        torch_dtype = pick_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        model.to(device).eval()
        log.info("loaded %s on %s as %s", path, device, torch_dtype)
        return cls(model, tokenizer, device)

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[TokenEvent]:
        seq = _Sequence(
            prompt_ids=list(prompt_ids),
            sampling=sampling,
            generator=make_generator(sampling.seed, self.device),
            seen=torch.tensor(sorted(set(prompt_ids)), dtype=torch.long, device=self.device),
            output_counts=torch.zeros(self.vocab_size, dtype=torch.long, device=self.device),
        )
        loop = asyncio.get_running_loop()
        while True:
            token = await loop.run_in_executor(self._executor, self._step, seq)
            finish = self._finish_reason(seq, token)
            yield TokenEvent(token, finish)
            if finish is not None:
                return

    @staticmethod
    def _finish_reason(seq: _Sequence, token: int):
        if token in seq.sampling.stop_token_ids:
            return "stop"
        if seq.generated >= seq.sampling.max_tokens:
            return "length"
        return None

    @torch.inference_mode()
    def _step(self, seq: _Sequence) -> int:
        """One forward pass for one sequence (prefill on the first call); returns the next token."""
        from transformers import DynamicCache

        if seq.cache is None:
            seq.cache = DynamicCache(config=self.model.config)
            input_ids = torch.tensor([seq.prompt_ids], device=self.device)
        else:
            input_ids = torch.tensor([[seq.last_token]], device=self.device)
        out = self.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: seq.cache}
        )
        logits = out.logits[0, -1].float()
        logits = process_logits(logits, seq.sampling, seq.seen, seq.output_counts, seq.generated)
        token = sample(logits, seq.sampling, seq.generator)
        seq.generated += 1
        seq.last_token = token
        seq.output_counts[token] += 1
        if seq.sampling.repetition_penalty != 1.0:
            seq.seen = torch.unique(torch.cat([seq.seen, seq.output_counts.new_tensor([token])]))
        return token

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
