"""The vLLM backend: vLLM's async engine behind the same token-level seam.

Prompts are rendered and output detokenized by the worker as for every backend, so vLLM gets
token ids in and gives token ids out (`detokenize=False`, delta outputs); stop strings stay the
worker's business. Closing the generator aborts the request in vLLM, freeing its KV blocks.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import AsyncIterator

from .backend import Sampling, TokenEvent

log = logging.getLogger(__name__)


def engine_args(path: Path, *, dtype: str, tensor_parallel_size: int, max_model_len: int | None,
                max_num_seqs: int, gpu_memory_utilization: float | None, extra: dict) -> dict:
    """vLLM engine arguments from our flags; `extra` (from --vllm-arg KEY=VALUE) wins. vLLM's
    automatic prefix caching is asked for explicitly (`--vllm-arg enable_prefix_caching=false`
    turns it off): a conversation's next turn then prefills only its new tokens."""
    args = {
        "model": str(path),
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "max_num_seqs": max_num_seqs,
        "disable_log_stats": True,
        "enable_prefix_caching": True,
    }
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    args.update(extra)
    return args


def sampling_params(sampling: Sampling):
    """Our resolved sampling parameters as vLLM's, one to one."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        min_tokens=sampling.min_tokens,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        seed=sampling.seed,
        stop_token_ids=sorted(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        logit_bias=dict(sampling.logit_bias) or None,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


class VLLMBackend:
    kind = "vllm"

    def __init__(self, engine, tokenizer, device: str, context_length: int, eos_token_ids: frozenset[int]):
        self.engine = engine
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.generation_defaults: dict = {}
        self.kv_free_tokens = 1 << 30  # vLLM pages its own KV cache and queues what does not fit

    @classmethod
    def load(cls, path: Path, **kwargs) -> "VLLMBackend":
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(path, **kwargs)
        log.info("starting vLLM with %s", args)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        config = engine.model_config
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_eos = (config.hf_config.eos_token_id if hasattr(config, "hf_config") else None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(gen_eos)
        device = str(getattr(engine.vllm_config.device_config, "device_type", "cpu"))
        return cls(engine, tokenizer, device, config.max_model_len, frozenset(eos))

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[TokenEvent]:
        request_id = uuid.uuid4().hex
        finished = False
        try:
            stream = self.engine.generate({"prompt_token_ids": list(prompt_ids)}, sampling_params(sampling), request_id)
            async for output in stream:
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                for i, token in enumerate(ids):
                    last = output.finished and i == len(ids) - 1
                    yield TokenEvent(token, _finish(completion.finish_reason) if last else None)
                if output.finished:
                    finished = True
                    return
        finally:
            if not finished:
                await self.engine.abort(request_id)

    async def close(self) -> None:
        self.engine.shutdown()


def _finish(reason: str | None) -> str:
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM ended the request with finish reason {reason!r}")
