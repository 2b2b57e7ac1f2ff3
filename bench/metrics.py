"""Per-request measurements and their summary: small pure functions."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    start: float  # monotonic seconds
    ok: bool = False
    error: str | None = None  # "http_429", "timeout", ... when not ok
    first_token: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    text: list[str] = field(default_factory=list)  # each content chunk's text
    prompt_tokens: int | None = None
    output_tokens: int = 0
    usage_reported: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.first_token is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution(values: list[float], scale: float = 1000.0) -> dict:
    """mean, p50, p90, p99 (in ms by default)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {
        "mean": statistics.fmean(values) * scale,
        "p50": percentile(values, 50) * scale,
        "p90": percentile(values, 90) * scale,
        "p99": percentile(values, 99) * scale,
    }


def meets_slo(r: RequestResult, ttft_ms: float | None, tpot_ms: float | None) -> bool:
    if not r.ok:
        return False
    if ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > ttft_ms):
        return False
    if tpot_ms is not None and r.tpot is not None and r.tpot * 1000 > tpot_ms:
        return False
    return True


def summarize(
    results: list[RequestResult],
    duration: float,
    *,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    goodput = sum(1 for r in results if meets_slo(r, slo_ttft_ms, slo_tpot_ms))
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output / duration if duration > 0 else 0.0,
        "total_token_throughput": (output + prompt) / duration if duration > 0 else 0.0,
        "goodput": goodput / duration if duration > 0 else 0.0,
        "output_tokens": output,
        "prompt_tokens": prompt,
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itls()]),
        "e2e_ms": distribution([r.e2e for r in ok if r.e2e is not None]),
    }
