"""Drives load at an OpenAI-compatible endpoint with a lean aiohttp client (one Python process
running the `openai` SDK saturates a core at ~130 streamed requests/s, below what the fabric
serves) and reports the metrics of `metrics.py`."""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from dataclasses import dataclass

import aiohttp

from .metrics import RequestResult, summarize
from .prompts import Prompt


@dataclass(frozen=True)
class Target:
    base_url: str  # ending in /v1
    model: str
    endpoint: str = "chat"  # or "completions"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    system: str | None = None
    timeout: float = 600.0

    @property
    def url(self) -> str:
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{self.base_url.rstrip('/')}/{path}"

    def body(self, prompt: Prompt) -> dict:
        body = {
            "model": self.model,
            "max_tokens": prompt.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            messages = [{"role": "system", "content": self.system}] if self.system else []
            body["messages"] = messages + [*prompt.earlier, {"role": "user", "content": prompt.text}]
        else:
            body["prompt"] = prompt.text
        return body


def _chunk_text(choice: dict) -> str:
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


async def one_request(session: aiohttp.ClientSession, target: Target, prompt: Prompt) -> RequestResult:
    """Stream one request; time the arrival of every content chunk."""
    result = RequestResult(start=time.perf_counter())
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    chunks = 0
    usage = None
    try:
        async with session.post(target.url, json=target.body(prompt), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=target.timeout)) as resp:
            if resp.status != 200:
                await resp.read()
                result.error = f"http_{resp.status}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream_{event['error'].get('code') or 'error'}"
                    return result
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    if text := _chunk_text(choice):
                        now = time.perf_counter()
                        result.token_times.append(now)
                        result.text.append(text)
                        if result.first_token is None:
                            result.first_token = now
                        chunks += 1
    except asyncio.TimeoutError:
        result.error = "timeout"
        return result
    except (aiohttp.ClientError, ValueError) as err:
        result.error = type(err).__name__
        return result
    result.end = time.perf_counter()
    result.ok = True
    if usage:
        result.usage_reported = True
        result.output_tokens = usage.get("completion_tokens", chunks)
        result.prompt_tokens = usage.get("prompt_tokens")
    else:
        result.output_tokens = chunks  # servers without stream usage: one chunk per token
    return result


class Progress:
    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.done = self.errors = 0

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.errors += 0 if result.ok else 1
        if self.enabled:
            sys.stderr.write(f"\r[{self.label}] {self.done}/{self.total} done, {self.errors} errors ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def run_concurrency(session, target, prompts, concurrency, time_cap, progress) -> list[RequestResult]:
    """Keep `concurrency` requests in flight until the prompts or the time cap run out."""
    queue = list(reversed(prompts))
    results: list[RequestResult] = []
    stop_at = time.perf_counter() + time_cap

    async def client() -> None:
        while queue and time.perf_counter() < stop_at:
            result = await one_request(session, target, queue.pop())
            results.append(result)
            progress.update(result)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


async def run_rate(session, target, prompts, rate, time_cap, progress, seed) -> list[RequestResult]:
    """Start requests at Poisson arrivals of `rate` per second."""
    rng = random.Random(seed)
    stop_at = time.perf_counter() + time_cap
    tasks = []

    async def tracked(prompt):
        result = await one_request(session, target, prompt)
        progress.update(result)
        return result

    for prompt in prompts:
        if time.perf_counter() >= stop_at:
            break
        tasks.append(asyncio.create_task(tracked(prompt)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


async def run_level(
    target: Target,
    prompts: list[Prompt],
    *,
    warm_prompts: list[Prompt] = (),
    concurrency: int | None = None,
    rate: float | None = None,
    time_cap: float = 600.0,
    seed: int = 0,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    progress: bool = True,
) -> dict:
    """One load level: warm up (not counted), then measure."""
    label = f"concurrency {concurrency}" if concurrency else f"rate {rate}/s"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        if warm_prompts:
            quiet = Progress(label, len(warm_prompts), False)
            await run_concurrency(session, target, list(warm_prompts), concurrency or 1, time_cap, quiet)
        bar = Progress(label, len(prompts), progress)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if concurrency:
            results = await run_concurrency(session, target, prompts, concurrency, time_cap, bar)
        else:
            results = await run_rate(session, target, prompts, rate, time_cap, bar, seed)
        duration = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        bar.close()
    summary = summarize(results, duration, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms)
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "load": label,
        "concurrency": concurrency,
        "request_rate": rate,
        "model": target.model,
        "endpoint": target.endpoint,
        "client_cpu_percent": 100 * client_cpu / duration if duration else 0.0,
        **summary,
    }


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ["label", "load", "ok/err", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p50",
            "E2E p50", "client CPU%"]
    lines = [head]
    for r in rows:
        lines.append([
            r.get("label") or "", r["load"], f"{r['completed']}/{r['requests'] - r['completed']}",
            fmt(r["request_throughput"], 2), fmt(r["output_throughput"]), fmt(r["ttft_ms"]["p50"]),
            fmt(r["ttft_ms"]["p99"]), fmt(r["tpot_ms"]["p50"]), fmt(r["itl_ms"]["p50"]), fmt(r["e2e_ms"]["p50"]),
            fmt(r["client_cpu_percent"], 0),
        ])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n(times in ms)"
