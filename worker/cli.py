"""`chatfabric worker`: its flags, loading its model and backend, and its run; `deploy/cli.py`
composes it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

from ..proto.bus import connect_from_args

log = logging.getLogger("chatfabric")

def add_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """The worker's flags; with `several` (`chatfabric up`), --model-path and --model-name may
    repeat, one worker per model (see `models_from_args`)."""
    from .prompting import TEMPLATES

    w = p.add_argument_group("worker")
    w.add_argument("--backend", choices=["hf", "vllm", "synthetic"], default="hf",
                   help="hf: Hugging Face transformers with continuous batching; vllm: vLLM's async engine "
                   "(extra [vllm]); synthetic: streams max_tokens tokens without a model, to measure the "
                   "fabric's own overhead")
    if several:
        w.add_argument("--model-path", action="append", default=[],
                       help="a transformers model folder (default: SmolLM2-135M-Instruct, built in); repeat it "
                       "to serve several models, one worker each")
        w.add_argument("--model-name", action="append", default=[],
                       help="name clients use in 'model' (default: the folder's name); repeat it to match "
                       "each --model-path, or alone to serve the default model under several names")
    else:
        w.add_argument("--model-path", help="a transformers model folder (default: SmolLM2-135M-Instruct, built in)")
        w.add_argument("--model-name", help="name clients use in 'model' (default: the folder's name)")
    w.add_argument("--adapter", help="a LoRA adapter merged into the model before serving: a folder, or "
                   "artifact://NAME from the artifacts store (--model-path also takes artifact://NAME)")
    w.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    w.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: float32 on CPU, bfloat16 (or float16) on CUDA",
    )
    w.add_argument("--max-concurrency", type=int, default=16,
                   help="requests served at once, batched together (default: %(default)s)")
    w.add_argument("--kv-cache-tokens", type=int,
                   help="KV cache budget in tokens (default: from free memory); requests that do not fit wait")
    w.add_argument("--max-model-len", type=int,
                   help="the context served: prompt plus answer, in tokens (default: the model's context length); "
                   "a shorter one bounds every request, the slots engine's default slot length and vLLM's KV cache")
    w.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per engine step, so long prompts do not stall decoding")
    w.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="hf backend: do not keep finished sequences' KV for prompts that start with the same "
                   "tokens (a conversation's next turn); kept by default, within the KV budget")
    w.add_argument("--engine", choices=["auto", "padded", "slots"], default="auto",
                   help="hf backend's batching engine: padded (a left-padded cache re-laid as requests come "
                   "and go) or slots (a preallocated cache row per request, CUDA graphs on CUDA); auto: "
                   "slots on CUDA, padded on CPU")
    w.add_argument("--slot-length", type=int,
                   help="slots engine: KV tokens per row, the longest prompt + max_tokens it serves (default: "
                   "the context length, or the KV budget's share per row if smaller)")
    w.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                   help="slots engine on CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    v = p.add_argument_group("vllm backend")
    v.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the model over")
    v.add_argument("--gpu-memory-utilization", type=float, help="share of GPU memory vLLM may use")
    v.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vLLM engine argument, e.g. --vllm-arg enforce_eager=true (repeatable)")
    w.add_argument(
        "--conv-template",
        choices=sorted(TEMPLATES),
        help="built-in chat template, for models without one of their own (or to override it)",
    )
    w.add_argument("--synthetic-delay", type=float, default=0.0,
                   help="--backend synthetic: seconds per token, to stand in for a model's decode speed")
    w.add_argument("--synthetic-step-ms", type=float, default=0.0,
                   help="--backend synthetic: advance every running sequence by one token per step of this many "
                   "milliseconds, all together, as a batched decode does (default: free-running)")
    w.add_argument("--metrics-port", type=int, default=_env_port("CHATFABRIC_METRICS_PORT"),
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: $CHATFABRIC_METRICS_PORT; "
                   "none). In `up`, the gateway's /metrics shows them anyway")
    w.add_argument("--heartbeat-interval", type=float, default=1.0,
                   help="seconds between liveness beats and per-request heartbeats (default: %(default)s)")
    w.add_argument("--stream-interval-ms", type=float, default=20.0,
                   help="how long a stream's later text may wait to be sent with its next (its first token never "
                   "waits): fewer, larger chunks when streams are fast; 0: every engine step (default: %(default)s)")
    w.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running requests get to finish on shutdown")


def _env_port(name: str) -> int | None:
    import os

    value = os.environ.get(name)
    return int(value) if value else None


def models_from_args(args) -> list[argparse.Namespace]:
    """One namespace per model for repeated --model-path / --model-name: paired in order; names
    alone serve the default model under each name; paths alone are named after their folders."""
    paths, names = list(args.model_path), list(args.model_name)
    if paths and names and len(paths) != len(names):
        raise ValueError(f"--model-path is given {len(paths)} times and --model-name {len(names)} times: "
                         "give one name per path, or none")
    count = max(len(paths), len(names), 1)
    paths = paths or [None] * count
    names = names or [None] * count
    models = [argparse.Namespace(**{**vars(args), "model_path": path, "model_name": name})
              for path, name in zip(paths, names)]
    served = [m.model_name or (Path(m.model_path).name if m.model_path else None) for m in models]
    twice = sorted({n for n in served if served.count(n) > 1 and n is not None})
    if twice or served.count(None) > 1:
        raise ValueError(f"two models would have the same name ({', '.join(twice) or 'the default'}): "
                         "give each a --model-name")
    return models


async def load(args):
    """Load the model (off the event loop) and return (backend, prompts, config)."""
    from ..models.default_model import DEFAULT_MODEL_NAME, ensure_default_model
    from .prompting import PromptBuilder
    from .config import WorkerConfig

    if getattr(args, "adapter", None) or (args.model_path or "").startswith("artifact://"):
        from .artifacts import resolve_model_folder

        opener = lambda: connect_from_args(args, "worker-fetch", role="worker")  # noqa: E731
        path, artifact = await resolve_model_folder(args.model_path, args.adapter, ensure_default_model, opener)
        name = args.model_name or artifact or path.name
    elif args.model_path:
        path = Path(args.model_path)
        if not path.is_dir():
            raise ValueError(f"--model-path {path} is not a folder")
        name = args.model_name or path.name
    else:
        path = await asyncio.to_thread(ensure_default_model)
        name = args.model_name or DEFAULT_MODEL_NAME
    config = WorkerConfig(
        model_name=name,
        max_concurrency=args.max_concurrency,
        heartbeat_interval=args.heartbeat_interval,
        shutdown_grace=args.shutdown_grace,
        stream_interval=args.stream_interval_ms / 1000,
    )
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise ValueError("--kv-cache-tokens must be positive")
    if args.prefill_chunk < 1:
        raise ValueError("--prefill-chunk must be positive")
    if args.slot_length is not None and args.slot_length < 2:
        raise ValueError("--slot-length must be at least 2")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError("--max-model-len must be at least 2")
    if args.backend == "vllm":
        from .vllm_backend import VLLMBackend

        backend = await asyncio.to_thread(
            VLLMBackend.load, path, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len, max_num_seqs=args.max_concurrency,
            gpu_memory_utilization=args.gpu_memory_utilization, extra=parse_vllm_args(args.vllm_arg),
        )
    elif args.backend == "synthetic":
        from transformers import AutoTokenizer

        from .synthetic import SyntheticBackend

        if args.synthetic_delay < 0 or args.synthetic_step_ms < 0:
            raise ValueError("--synthetic-delay and --synthetic-step-ms must not be negative")
        if args.synthetic_delay and args.synthetic_step_ms:
            raise ValueError("give --synthetic-delay or --synthetic-step-ms, not both")
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(path))
        backend = SyntheticBackend(tokenizer, token_delay=args.synthetic_delay, step=args.synthetic_step_ms / 1000,
                                   context_length=args.max_model_len or SyntheticBackend.CONTEXT_LENGTH)
    else:
        from .hf import HFBackend

        backend = await asyncio.to_thread(
            HFBackend.load, path, args.device, args.dtype,
            max_batch=args.max_concurrency, kv_cache_tokens=args.kv_cache_tokens, prefill_chunk=args.prefill_chunk,
            engine=args.engine, slot_length=args.slot_length, cuda_graphs=args.cuda_graphs,
            max_model_len=args.max_model_len, prefix_cache=args.prefix_cache,
        )
    prompts = PromptBuilder(backend.tokenizer, args.conv_template)
    if not prompts.can_chat:
        log.warning("%s has no chat template: chat requests will be refused (see --conv-template)", name)
    return backend, prompts, config


def parse_vllm_args(items: list[str]) -> dict:
    """KEY=VALUE pairs; values that read as JSON (numbers, true/false) are converted."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--vllm-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except ValueError:
            out[key.replace("-", "_")] = raw
    return out


async def run(args, stop: asyncio.Event) -> None:
    """Load the model, then serve it on the fabric until `stop` is set."""
    from .service import Worker

    backend, prompts, config = await load(args)
    if args.metrics_port is not None:
        from .metrics import serve_metrics

        serve_metrics(args.metrics_port)
        log.info("worker metrics at http://0.0.0.0:%d/metrics", args.metrics_port)
    try:
        async with connect_from_args(args, "worker", stop, role="worker") as bus:
            await Worker(bus, backend, prompts, config).run(stop)
    finally:
        await backend.close()
