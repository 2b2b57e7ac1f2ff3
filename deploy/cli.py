"""The `chatfabric` command: `up` (everything on one machine), `gateway`, `worker`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from ..proto.auth import (
    CREDENTIALS_FILE,
    NatsAuth,
    add_auth_args,
    auth_from_args,
    binds_beyond_loopback,
    ensure_credentials,
    join_instructions,
    render_authorization,
)
from ..proto.bus import BusConfig, BusLost, connect
from ..proto.embedded import EmbeddedServer

log = logging.getLogger("chatfabric")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def data_dir() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "chatfabric"


# -- argument groups ------------------------------------------------------------------------


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    g.add_argument(
        "--api-keys",
        default=os.environ.get("CHATFABRIC_API_KEYS", ""),
        help="comma-separated keys clients must send as 'Authorization: Bearer KEY' "
        "(default: $CHATFABRIC_API_KEYS; empty: no authentication)",
    )
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (default: 4 MiB)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may queue and run (default: %(default)s)")
    g.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=15.0,
        help="seconds of silence on a started request before it fails with 504, while its worker is alive "
        "(default: %(default)s)",
    )
    g.add_argument("--liveness-timeout", type=float, default=3.0,
                   help="seconds without a worker's liveness beat (at least 3 of its heartbeat intervals) before "
                   "its started requests fail with 504 worker_timeout (default: %(default)s)")
    g.add_argument("--max-prompts", type=int, default=32,
                   help="prompts allowed in one /v1/completions request (default: %(default)s)")
    g.add_argument("--max-choices", type=int, default=64,
                   help="completions (prompts x n) allowed in one request (default: %(default)s)")
    g.add_argument("--drain-timeout", type=float, default=10.0,
                   help="seconds responses in progress get to finish when the gateway stops (default: %(default)s)")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    from ..worker.prompting import TEMPLATES

    w = p.add_argument_group("worker")
    w.add_argument("--backend", choices=["hf", "vllm", "synthetic"], default="hf",
                   help="hf: Hugging Face transformers with continuous batching; vllm: vLLM's async engine "
                   "(extra [vllm]); synthetic: streams max_tokens tokens without a model, to measure the "
                   "fabric's own overhead")
    w.add_argument("--model-path", help="a transformers model folder (default: SmolLM2-135M-Instruct, built in)")
    w.add_argument("--model-name", help="name clients use in 'model' (default: the folder's name)")
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
    w.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per engine step, so long prompts do not stall decoding")
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
    v.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    v.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vLLM engine argument, e.g. --vllm-arg enforce_eager=true (repeatable)")
    w.add_argument(
        "--conv-template",
        choices=sorted(TEMPLATES),
        help="built-in chat template, for models without one of their own (or to override it)",
    )
    w.add_argument("--synthetic-delay", type=float, default=0.0,
                   help="--backend synthetic: seconds per token, to stand in for a model's decode speed")
    w.add_argument("--heartbeat-interval", type=float, default=1.0,
                   help="seconds between liveness beats and per-request heartbeats (default: %(default)s)")
    w.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running requests get to finish on shutdown")


def add_common_args(p: argparse.ArgumentParser, *, embedded: bool) -> None:
    help_url = (
        "NATS server to join (default: $NATS_URL; with neither, an embedded server is started)"
        if embedded
        else f"NATS server to join (default: $NATS_URL, else {DEFAULT_NATS_URL})"
    )
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL"), help=help_url)
    p.add_argument("--log-level", default=os.environ.get("CHATFABRIC_LOG_LEVEL", "INFO"), help="(default: %(default)s)")
    add_auth_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatfabric", description="Serve, evaluate and train LLM chatbots on a NATS JetStream fabric."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run NATS, a gateway and a worker on this machine",
                        description="Start everything on one machine: an embedded NATS server (unless "
                        "--nats-url or $NATS_URL names one), the OpenAI-compatible gateway, and one worker.")
    add_gateway_args(up)
    add_worker_args(up)
    up.add_argument("--data-dir", type=Path, default=data_dir(), help="embedded NATS storage (default: %(default)s)")
    up.add_argument("--nats-host", default="127.0.0.1",
                    help="address the embedded NATS server listens on (default: %(default)s, this machine only); "
                    "beyond loopback (e.g. 0.0.0.0, for workers on other machines) it requires credentials, "
                    "generated once into DATA_DIR/nats/nats-credentials.json")
    up.add_argument("--nats-port", type=int, help="port of the embedded NATS server (default: 4222 when free)")
    add_common_args(up, embedded=True)

    gw = sub.add_parser("gateway", help="run an OpenAI-compatible gateway",
                        description="Serve the OpenAI REST API, backed by the workers on the fabric.")
    add_gateway_args(gw)
    add_common_args(gw, embedded=False)

    wk = sub.add_parser("worker", help="serve a model to the fabric",
                        description="Pull requests for one model from the fabric and generate.")
    add_worker_args(wk)
    add_common_args(wk, embedded=False)

    from ..bench.cli import add_bench_args

    bn = sub.add_parser("bench", help="benchmark an OpenAI-compatible endpoint",
                        description="Measure TTFT, TPOT, inter-token latency, end-to-end latency and "
                        "throughput of any OpenAI-compatible server (chatfabric, vLLM, FastChat).")
    add_bench_args(bn)
    bn.add_argument("--log-level", default="WARNING")
    return parser


# -- building configs -----------------------------------------------------------------------


def gateway_config(args):
    from ..gateway.app import GatewayConfig

    return GatewayConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(k.strip() for k in args.api_keys.split(",") if k.strip()),
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        liveness_timeout=args.liveness_timeout,
        max_prompts=args.max_prompts,
        max_choices=args.max_choices,
        shutdown_grace=args.drain_timeout,
    )


async def load_worker(args):
    """Load the model (off the event loop) and return (backend, prompts, config)."""
    from ..worker.default_model import DEFAULT_MODEL_NAME, ensure_default_model
    from ..worker.hf import HFBackend
    from ..worker.prompting import PromptBuilder
    from ..worker.service import WorkerConfig

    if args.model_path:
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
    )
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise ValueError("--kv-cache-tokens must be positive")
    if args.prefill_chunk < 1:
        raise ValueError("--prefill-chunk must be positive")
    if args.slot_length is not None and args.slot_length < 2:
        raise ValueError("--slot-length must be at least 2")
    if args.backend == "vllm":
        from ..worker.vllm_backend import VLLMBackend

        backend = await asyncio.to_thread(
            VLLMBackend.load, path, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len, max_num_seqs=args.max_concurrency,
            gpu_memory_utilization=args.gpu_memory_utilization, extra=parse_vllm_args(args.vllm_arg),
        )
    elif args.backend == "synthetic":
        from transformers import AutoTokenizer

        from ..worker.synthetic import SyntheticBackend

        if args.synthetic_delay < 0:
            raise ValueError("--synthetic-delay must not be negative")
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(path))
        backend = SyntheticBackend(tokenizer, token_delay=args.synthetic_delay)
    else:
        backend = await asyncio.to_thread(
            HFBackend.load, path, args.device, args.dtype,
            max_batch=args.max_concurrency, kv_cache_tokens=args.kv_cache_tokens, prefill_chunk=args.prefill_chunk,
            engine=args.engine, slot_length=args.slot_length, cuda_graphs=args.cuda_graphs,
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


# -- commands -------------------------------------------------------------------------------


async def run_gateway(args, stop: asyncio.Event) -> None:
    from ..gateway.app import serve

    config = gateway_config(args)
    bus_config = BusConfig.from_env(url=args.nats_url or DEFAULT_NATS_URL)
    async with connect(bus_config, "gateway", stop, auth=auth_from_args(args), role="gateway") as bus:
        await serve(bus, config, stop)


async def run_worker(args, stop: asyncio.Event) -> None:
    from ..worker.service import Worker

    backend, prompts, config = await load_worker(args)
    try:
        bus_config = BusConfig.from_env(url=args.nats_url or DEFAULT_NATS_URL)
        async with connect(bus_config, "worker", stop, auth=auth_from_args(args), role="worker") as bus:
            await Worker(bus, backend, prompts, config).run(stop)
    finally:
        await backend.close()


async def run_up(args, stop: asyncio.Event) -> None:
    from ..gateway.app import serve
    from ..worker.service import Worker

    gw_config = gateway_config(args)
    backend, prompts, wk_config = await load_worker(args)
    try:
        async with embedded_or_joined(args) as (bus_config, auth, joining):
            async with connect(bus_config, "chatfabric-up", stop, auth=auth, role="admin") as bus:
                worker = asyncio.create_task(Worker(bus, backend, prompts, wk_config).run(stop), name="worker")
                gateway = asyncio.create_task(serve(bus, gw_config, stop), name="gateway")
                await asyncio.sleep(0.5)
                if not (worker.done() or gateway.done()):
                    print_banner(gw_config, bus.nc.connected_url, wk_config.model_name, joining)
                await asyncio.wait([worker, gateway], return_when=asyncio.FIRST_EXCEPTION)
                stop.set()
                await asyncio.gather(worker, gateway)
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def embedded_or_joined(args):
    """(bus config, credentials, how remote workers join) for `up`: the fabric at --nats-url /
    $NATS_URL when one is named (said loudly: `up` then adds to someone else's fabric), else an
    embedded server, which requires generated credentials when it listens beyond loopback."""
    bus_config = BusConfig.from_env(url=args.nats_url, store_dir=args.data_dir / "nats")
    if bus_config.url:
        source = "--nats-url" if args.nats_url != os.environ.get("NATS_URL") else "$NATS_URL"
        log.warning("joining the existing fabric at %s (from %s) instead of starting a NATS server; "
                    "unset NATS_URL to run everything here", bus_config.url, source)
        yield bus_config, auth_from_args(args), f"joined the existing fabric at {bus_config.url} (from {source})"
        return
    store = args.data_dir / "nats"
    server = EmbeddedServer(host=args.nats_host, port=args.nats_port, store_dir=store)
    auth, joining = NatsAuth(), None
    if binds_beyond_loopback(args.nats_host):
        passwords = ensure_credentials(store)
        server.authorization = render_authorization(passwords)
        auth = NatsAuth.for_role("admin", passwords)
    await asyncio.to_thread(server.start)
    try:
        if server.authorization is not None:
            joining = join_instructions(server.url, passwords, store / CREDENTIALS_FILE)
        yield dataclasses.replace(bus_config, url=server.url), auth, joining
    finally:
        await asyncio.to_thread(server.stop)


def print_banner(config, nats_url, model: str, joining: str | None) -> None:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    base = f"http://{host}:{config.port}/v1"
    nats = f"{nats_url.scheme}://{nats_url.hostname}:{nats_url.port}"
    auth = ' -H "Authorization: Bearer $KEY"' if config.api_keys else ""
    if joining is None:
        joining = (f"NATS listens on this machine only ({nats}). To add workers on other machines, start with "
                   f"--nats-host 0.0.0.0: credentials are generated and printed here.")
    print(
        f"\nchatfabric is up: OpenAI-compatible API at {base} (model '{model}'), NATS at {nats}\n"
        f"Try it:\n  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{{\"model\": \"{model}\", \"temperature\": 0, "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
        f"{joining}\n"
        f"Press Ctrl-C to stop.\n",
        flush=True,
    )


COMMANDS = {"up": run_up, "gateway": run_gateway, "worker": run_worker}


SHUTDOWN_MARGIN = 15.0  # seconds beyond the configured grace before a stuck shutdown is cut short


async def _main(args) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    grace = max(getattr(args, "shutdown_grace", 0.0), getattr(args, "drain_timeout", 0.0)) + SHUTDOWN_MARGIN

    def on_signal(sig: int) -> None:
        if stop.is_set():  # a second Ctrl-C or SIGTERM: the user does not want to wait
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(128 + sig)
        log.info("%s: shutting down", signal.Signals(sig).name)
        stop.set()
        _exit_after(grace)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await COMMANDS[args.command](args, stop)


def _exit_after(seconds: float) -> None:
    """Whatever hangs during shutdown (a broken connection, a stuck handler), the process is gone
    within `seconds` of the signal."""
    def cut_short() -> None:
        log.error("shutdown did not finish within %.0fs; exiting", seconds)
        os._exit(1)

    timer = threading.Timer(seconds, cut_short)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from ..bench.cli import main as bench_main

        try:
            return bench_main(args)
        except ValueError as err:
            print(f"chatfabric bench: error: {err}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        asyncio.run(_main(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"chatfabric {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BusLost as err:
        print(f"chatfabric {args.command}: {err}; exiting so that a supervisor restarts it", file=sys.stderr)
        return 1
    except (ConnectionError, OSError) as err:
        print(f"chatfabric {args.command}: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
