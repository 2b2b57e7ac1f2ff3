"""Engine-level benchmark: the transformers engines without the fabric, on one machine.

    python -m chatfabric.bench.engine --model-config smollm2-1.7b --device cuda --concurrency 1,16,64

For each engine and concurrency c, c requests start at once (random prompt token ids of
--input-len tokens, --output-len greedy tokens each, no end-of-sequence) after one warm-up round
at the same shape; reported are output tokens/s and milliseconds per decode step. Engines:

- generate: transformers' own `generate()` over a static batch of c, the baseline (a
  FastChat-style worker runs it with c = 1);
- padded: the padded continuous-batching engine (`worker/engine.py`, the CPU default);
- slots: the slot engine (`worker/slots.py`) run eagerly;
- slots-graphs: the slot engine with CUDA graphs (the CUDA default).

--model-path serves a real model folder; --model-config builds one with random weights from a
named shape or a config.json (timings do not depend on the weights), so GPU-sized models can be
measured where none can be downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..worker import attention as grouped

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied embeddings)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 49152, True),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "tiny": (128, 256, 2, 4, 2, 1024, True),
    # SmolLM2's vocabulary on a tiny body: fast steps on a CPU, served with SmolLM2's tokenizer
    "smollm2-tiny": (128, 256, 2, 4, 2, 49152, True),
}
ENGINES = ("generate", "padded", "slots", "slots-graphs")


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from ..worker.hf import pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.model_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(device)
        return model.eval(), device, args.model_path
    if args.model_config in SHAPES:
        hidden, inter, layers, heads, kv, vocab, tied = SHAPES[args.model_config]
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                             tie_word_embeddings=tied, max_position_embeddings=8192, rope_theta=130000.0)
    else:
        config = AutoConfig.from_pretrained(args.model_config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), device, f"{args.model_config} (random weights)"


def save_model(model, folder: Path, tokenizer: Path | None) -> None:
    from transformers import AutoTokenizer

    from ..worker.hf import check_vocabulary

    if tokenizer is None:
        raise SystemExit("--save-model needs --tokenizer (a folder with tokenizer files)")
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    try:
        check_vocabulary(tok, model)  # as a worker would, at load
    except ValueError as err:
        raise SystemExit(f"--tokenizer: {err}; pick a shape with the tokenizer's vocabulary "
                         "(e.g. smollm2-tiny for SmolLM2's)") from None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    print(f"saved {folder}")


def make_engine(name: str, model, device: str, max_batch: int, tokens_per_request: int, prefill_chunk: int):
    from ..worker.engine import BatchEngine
    from ..worker.slots import SlotEngine

    common = dict(vocab_size=model.get_output_embeddings().weight.shape[0], device=device, max_batch=max_batch,
                  kv_budget_tokens=max_batch * tokens_per_request, prefill_chunk=prefill_chunk)
    if name == "padded":
        return BatchEngine(model, **common)
    return SlotEngine(model, slot_length=tokens_per_request, cuda_graphs=name == "slots-graphs", **common)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, device: str, prompts: list[list[int]], output_len: int) -> tuple[float, int, None]:
    input_ids = torch.tensor(prompts, device=device)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # run to max_new_tokens, like the engines' ignore_eos, with no extra processor
    config.update(do_sample=False, max_new_tokens=output_len, pad_token_id=0)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    sync(device)
    assert out.shape[1] == input_ids.shape[1] + output_len, "generate() ended early"
    return time.perf_counter() - start, output_len, None  # generate() streams nothing: no TTFT


def run_engine(engine, prompts: list[list[int]], output_len: int) -> tuple[float, int, float]:
    from ..worker.backend import Sampling

    sampling = Sampling(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    first_token: list[float] = []

    async def one(ids):
        out = []
        async for event in engine.generate(ids, sampling):
            if not out:
                first_token.append(time.perf_counter() - start)
            out.append(event.token_id)
        return out

    async def all_of_them():
        return await asyncio.gather(*[one(p) for p in prompts])

    steps = engine.steps
    start = time.perf_counter()
    outputs = asyncio.run(all_of_them())
    elapsed = time.perf_counter() - start
    assert all(len(o) == output_len for o in outputs), "a request ended early"
    return elapsed, engine.steps - steps, statistics.median(first_token)


def probe_ttft(engine, vocab: int, count: int, input_len: int, seed: int) -> list[float]:
    """Time to first token of `count` requests sent one after another, with prompt lengths drawn
    between half and one and a half times input_len, as real traffic has: new prompt shapes."""
    from ..worker.backend import Sampling

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(input_len // 2, 1), input_len * 3 // 2 + 1, (count,), generator=generator).tolist()
    sampling = Sampling(max_tokens=2, temperature=0.0, ignore_eos=True)

    async def one(n: int) -> float:
        ids = torch.randint(10, vocab, (n,), generator=generator).tolist()
        start = time.perf_counter()
        first = None
        async for _ in engine.generate(ids, sampling):
            first = first or time.perf_counter() - start
        return first

    async def all_of_them():
        return [await one(n) for n in lengths]

    return asyncio.run(all_of_them())


def profiled(enabled: bool, device: str, fn, *args):
    """fn(*args), under torch.profiler when enabled: prints the ops that took the most device
    (or CPU) time and how busy the device was."""
    if not enabled:
        return fn(*args)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        result = fn(*args)
    averages = prof.key_averages()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    busy = sum(getattr(e, key, 0) for e in averages) / 1e6
    print(averages.table(sort_by=key, row_limit=12))
    print(f"{key}: {busy:.3f} s of {result[0]:.3f} s wall ({100 * busy / result[0]:.0f}%)")
    return result


def measure(args, model, device: str, name: str, concurrency: int) -> dict:
    generator = torch.Generator().manual_seed(args.seed + concurrency)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = torch.randint(10, vocab, (concurrency, args.input_len), generator=generator).tolist()
    # generate() runs transformers' stock attention; the engines what the worker runs (worker/hf.py)
    if name == "generate":
        if model.config._attn_implementation == grouped.NAME:
            model.set_attn_implementation("sdpa")
    else:
        grouped.use_grouped_sdpa(model)
    if name == "generate":
        run_generate(model, device, prompts, args.output_len)  # warm-up
        elapsed, steps, ttft = profiled(args.profile, device, run_generate, model, device, prompts, args.output_len)
    else:
        longest = args.input_len * 3 // 2 + args.output_len  # --ttft-probe's prompts are up to 1.5x input_len
        engine = make_engine(name, model, device, concurrency, longest, args.prefill_chunk)
        try:
            run_engine(engine, prompts, args.output_len)  # warm-up (and graph capture)
            elapsed, steps, ttft = profiled(args.profile, device, run_engine, engine, prompts, args.output_len)
            probe = probe_ttft(engine, vocab, args.ttft_probe, args.input_len, args.seed) if args.ttft_probe else []
        finally:
            engine.close()
            del engine
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {
        "engine": name,
        "concurrency": concurrency,
        "output_tokens_per_s": round(concurrency * args.output_len / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / max(steps, 1), 2),
        "ttft_ms_p50": None if ttft is None else round(1000 * ttft, 1),
        "seconds": round(elapsed, 3),
        **({"probe_ttft_ms_p50": round(1000 * statistics.median(probe), 1),
            "probe_ttft_ms_max": round(1000 * max(probe), 1)} if name != "generate" and args.ttft_probe else {}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", help="a transformers model folder")
    source.add_argument("--model-config", help=f"random weights: one of {', '.join(SHAPES)}, or a config.json")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES))
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels (default: %(default)s)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-probe", type=int, default=0, metavar="N",
                        help="after each engine's run, N requests one by one with varied prompt lengths: "
                        "their TTFT median and maximum")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="keep torch's SDPA off the cuDNN backend (for comparison)")
    parser.add_argument("--profile", action="store_true",
                        help="run each timed round under torch.profiler and print where the time went")
    parser.add_argument("--output", type=Path, help="append one JSON line per measurement to this file")
    parser.add_argument("--save-model", type=Path, metavar="DIR",
                        help="instead of measuring, write the model (with --tokenizer's files) to DIR, for "
                        "`chatfabric worker --model-path DIR`")
    parser.add_argument("--tokenizer", type=Path, help="a folder with the tokenizer to save beside the model")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error("--concurrency takes comma-separated integers")
    if any(c < 1 for c in levels) or args.input_len < 1 or args.output_len < 2:
        parser.error("concurrency and --input-len must be >= 1, --output-len >= 2")

    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    model, device, label = build_model(args)
    if args.save_model:
        save_model(model, args.save_model, args.tokenizer)
        return
    if "slots-graphs" in engines and not device.startswith("cuda"):
        engines.remove("slots-graphs")
        print("slots-graphs skipped: CUDA graphs need a CUDA device")
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"{label} on {machine}, {model.dtype}, {args.input_len} prompt + {args.output_len} output tokens")
    print(f"{'engine':<14}{'conc':>6}{'out tok/s':>12}{'ms/step':>10}{'TTFT p50 ms':>13}")
    for concurrency in levels:
        for name in engines:
            row = measure(args, model, device, name, concurrency)
            ttft = "-" if row["ttft_ms_p50"] is None else row["ttft_ms_p50"]
            probe = (f"  probe TTFT p50 {row['probe_ttft_ms_p50']} ms, max {row['probe_ttft_ms_max']} ms"
                     if "probe_ttft_ms_p50" in row else "")
            print(f"{name:<14}{concurrency:>6}{row['output_tokens_per_s']:>12}{row['ms_per_step']:>10}{ttft:>13}{probe}",
                  flush=True)
            if args.output:
                row.update(model=label, device=machine, dtype=str(model.dtype).removeprefix("torch."),
                           input_len=args.input_len, output_len=args.output_len,
                           date=datetime.date.today().isoformat(), torch=torch.__version__)
                with args.output.open("a") as out:
                    out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
