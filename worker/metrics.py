"""A worker's Prometheus metrics and its requests' spans.

Metrics, labelled by the model served (bounded: one label value per worker): requests running
(started) and waiting (pulled, not started), KV cache capacity and use, the tokens the prefix
cache holds, prompt and generated tokens (tokens/s is
`rate(chatfabric_worker_generated_tokens_total[1m])`), engine passes by phase (prefill, decode:
time and sequences per pass), time to first token at the worker.
`--metrics-port` serves them (`/metrics`, a thread of prometheus_client's); in `chatfabric up`
the gateway's `/metrics` shows them as well (one process, one registry).

Spans (proto/tracing.py; no-ops unless tracing is on) continue the gateway's trace from the
request's `traceparent`: `jetstream.queued` (from when JetStream stored the request to when
this worker took it), and `worker.generate` with its children `prefill` (to the first token)
and `decode` (to the last).
"""

from __future__ import annotations

import time

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from ..proto import tracing

PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

RUNNING = Gauge("chatfabric_worker_requests_running", "Requests generating now", ["model"])
WAITING = Gauge("chatfabric_worker_requests_waiting", "Requests pulled but not yet started", ["model"])
KV_CAPACITY = Gauge("chatfabric_worker_kv_cache_tokens", "KV cache budget in tokens", ["model"])
KV_USED = Gauge("chatfabric_worker_kv_cache_used_tokens", "KV cache tokens reserved by running requests", ["model"])
PREFIX_CACHED = Gauge("chatfabric_worker_prefix_cache_tokens",
                      "KV cache tokens of finished sequences kept for prompts that start with them", ["model"])
PROMPT_TOKENS = Counter("chatfabric_worker_prompt_tokens_total", "Prompt tokens of requests served", ["model"])
GENERATED = Counter("chatfabric_worker_generated_tokens_total", "Tokens generated", ["model"])
REQUESTS = Counter("chatfabric_worker_requests_total", "Requests ended, by outcome", ["model", "outcome"])
PASS_SECONDS = Histogram("chatfabric_worker_pass_seconds", "One engine pass, by phase", ["model", "phase"],
                         buckets=PASS_BUCKETS)
PASS_SIZE = Histogram("chatfabric_worker_pass_sequences", "Sequences in one engine pass, by phase",
                      ["model", "phase"], buckets=BATCH_BUCKETS)
TTFT = Histogram("chatfabric_worker_time_to_first_token_seconds", "From taking a request to its first token",
                 ["model"], buckets=LATENCY_BUCKETS)

_tracer = tracing.tracer("chatfabric.worker")


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` from a thread (the event loop never renders a scrape)."""
    start_http_server(port, addr=host)


def watch(model: str, runner_jobs, backend) -> None:
    """Gauges read when scraped: the runner's jobs and the backend's KV cache."""
    from ..proto.jobs import JobState

    RUNNING.labels(model).set_function(lambda: sum(j.state is JobState.STARTED for j in runner_jobs()))
    WAITING.labels(model).set_function(lambda: sum(j.state is JobState.WAITING for j in runner_jobs()))
    capacity = getattr(backend, "kv_cache_tokens", None)
    if capacity is not None:
        KV_CAPACITY.labels(model).set(capacity)
        KV_USED.labels(model).set_function(lambda: capacity - backend.kv_free_tokens)
    engine = getattr(backend, "engine", None)
    if getattr(engine, "prefix_caching", False):
        PREFIX_CACHED.labels(model).set_function(lambda: engine.prefix_cached_tokens)
    if engine is not None and hasattr(engine, "on_pass"):
        seconds = {phase: PASS_SECONDS.labels(model, phase) for phase in ("prefill", "decode")}
        sizes = {phase: PASS_SIZE.labels(model, phase) for phase in ("prefill", "decode")}

        def on_pass(phase: str, elapsed: float, sequences: int) -> None:
            seconds[phase].observe(elapsed)
            sizes[phase].observe(sequences)

        engine.on_pass = on_pass


class RequestTrace:
    """One request's metrics and spans, from when this worker took it to its end."""

    def __init__(self, model: str, traceparent: str | None, queued_since_ns: int | None, request_id: str):
        self.model = model
        self.taken = time.monotonic()
        self.first_token = False
        self.traced = tracing.enabled()
        if not self.traced:  # no spans to make: the metrics alone
            return
        parent = tracing.extract(traceparent)
        now = time.time_ns()
        if queued_since_ns is not None and queued_since_ns <= now:
            _tracer.start_span("jetstream.queued", context=parent, start_time=queued_since_ns).end(end_time=now)
        self.span = _tracer.start_span("worker.generate", context=parent, kind=trace.SpanKind.CONSUMER,
                                       attributes={"chatfabric.model": model, "chatfabric.request_id": request_id})
        inside = trace.set_span_in_context(self.span)
        self.phase = _tracer.start_span("prefill", context=inside)
        self._inside = inside

    def token(self) -> None:
        """A token was generated (the first one ends the prefill)."""
        if not self.first_token:
            self.first_token = True
            TTFT.labels(self.model).observe(time.monotonic() - self.taken)
            if self.traced:
                self.phase.end()
                self.phase = _tracer.start_span("decode", context=self._inside)

    def end(self, outcome: str, prompt_tokens: int = 0, generated: int = 0) -> None:
        REQUESTS.labels(self.model, outcome).inc()
        PROMPT_TOKENS.labels(self.model).inc(prompt_tokens)
        GENERATED.labels(self.model).inc(generated)
        if not self.traced:
            return
        self.phase.end()
        self.span.set_attributes({"chatfabric.outcome": outcome, "chatfabric.prompt_tokens": prompt_tokens,
                                  "chatfabric.completion_tokens": generated})
        if outcome != "ok":
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        self.span.end()
