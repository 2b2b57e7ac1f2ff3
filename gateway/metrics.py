"""The gateway's Prometheus metrics, served at `GET /metrics`.

Labels are bounded: `route` is the route's pattern, `model` a model some worker served when the
request was accepted (anything else is counted as `model=""`), `status` the HTTP status, `code`
an error code from a fixed set. No request ids. Process-wide (prometheus_client's default
registry), so `chatfabric up` shows its workers' metrics (worker/metrics.py) here too.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from ..proto import tracing
from ..proto.messages import DeltaChunk, FinalChunk

log = logging.getLogger(__name__)

MODEL_KEY = web.RequestKey("metrics_model", str) if hasattr(web, "RequestKey") else "metrics_model"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter("chatfabric_gateway_requests_total", "HTTP requests answered", ["route", "model", "status"])
TTFT = Histogram("chatfabric_gateway_time_to_first_token_seconds", "From publish to the first token, per choice",
                 ["model"], buckets=LATENCY_BUCKETS)
INTER_TOKEN = Histogram("chatfabric_gateway_inter_token_seconds", "Between two streamed deltas of a choice",
                        ["model"], buckets=TOKEN_BUCKETS)
E2E = Histogram("chatfabric_gateway_request_duration_seconds", "From publish to the final chunk, per choice",
                ["model"], buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("chatfabric_gateway_queue_wait_seconds",
                       "From publish until a worker first answered (time queued in JetStream)", ["model"],
                       buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("chatfabric_gateway_streams_in_flight", "Choices being generated now", ["model"])
PROMPT_TOKENS = Counter("chatfabric_gateway_prompt_tokens_total", "Prompt tokens of finished choices", ["model"])
COMPLETION_TOKENS = Counter("chatfabric_gateway_completion_tokens_total", "Generated tokens of finished choices",
                            ["model"])
ERRORS = Counter("chatfabric_gateway_generation_errors_total", "Choices that ended in an error, by code",
                 ["model", "code"])
QUEUE_DEPTH = Gauge("chatfabric_queue_depth", "Requests waiting in GEN for the model's workers", ["model"])
WORKERS = Gauge("chatfabric_workers_alive", "Live workers of the model", ["model"])
QUEUE_DEPTH_TIMEOUT = 1.0  # seconds a scrape waits for JetStream's consumer counts


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    """Count every answered request (outermost, so errors turned into responses count too)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as err:
        status = err.status
        raise
    finally:
        if request.path != "/metrics":
            REQUESTS.labels(route_of(request), request.get(MODEL_KEY, ""), str(status)).inc()


_tracer = tracing.tracer("chatfabric.gateway")


@web.middleware
async def tracing_middleware(request: web.Request, handler):
    """A server span per API request, continuing the client's `traceparent` when it sent one.
    The generations it starts are its children (gateway/generations.py)."""
    if not tracing.enabled() or not request.path.startswith("/v1/"):
        return await handler(request)
    parent = tracing.extract(request.headers.get("traceparent"))
    with _tracer.start_as_current_span(f"{request.method} {route_of(request)}", context=parent,
                                       kind=trace.SpanKind.SERVER) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if request.get(MODEL_KEY):
            span.set_attribute("chatfabric.model", request[MODEL_KEY])
        return response


async def page(generations) -> web.Response:
    """The Prometheus page, its fabric gauges refreshed first (`generations`: None before the
    gateway is on the bus)."""
    if generations is not None:
        await refresh_fabric_gauges(generations)
    body = await asyncio.to_thread(generate_latest, REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def refresh_fabric_gauges(generations) -> None:
    """Workers alive per model from the registry; queue depth per model from its consumer."""
    served = generations.registry.models()
    for labels in list(WORKERS._metrics):
        if labels[0] not in served:
            WORKERS.remove(*labels)
            QUEUE_DEPTH.remove(*labels) if labels in QUEUE_DEPTH._metrics else None
    for model, cards in served.items():
        WORKERS.labels(model).set(len(cards))

    async def depth(model: str) -> None:
        try:
            QUEUE_DEPTH.labels(model).set(await generations.bus.queue_depth(model))
        except Exception as err:  # a scrape must answer even when JetStream does not
            log.debug("queue depth of %s: %s", model, err)

    if served:
        await asyncio.wait([asyncio.create_task(depth(m)) for m in served], timeout=QUEUE_DEPTH_TIMEOUT)


class ChoiceStats:
    """One choice's metrics, span and log line, from publish to its end. The span is a child
    of the request's server span; its `traceparent` travels to the worker."""

    def __init__(self, model: str, request_id: str):
        self.model, self.request_id = model, request_id
        self.published = self.last = time.monotonic()
        self.first_token: float | None = None
        self.usage = None
        self.finish = None
        self.error: str | None = None
        self.span = (_tracer.start_span("generation", kind=trace.SpanKind.PRODUCER,
                                        attributes={"chatfabric.model": model, "chatfabric.request_id": request_id})
                     if tracing.enabled() else trace.INVALID_SPAN)
        # each series looked up once per choice, not once per chunk
        self.ttft, self.inter_token = TTFT.labels(model), INTER_TOKEN.labels(model)
        self.in_flight = IN_FLIGHT.labels(model)
        self.in_flight.inc()

    def chunk(self, chunk, first_answer: float | None) -> None:
        now = time.monotonic()
        if isinstance(chunk, DeltaChunk):
            if self.first_token is None:
                self.first_token = now
                self.ttft.observe(now - self.published)
                self.span.add_event("first token")
            else:
                self.inter_token.observe(now - self.last)
            self.last = now
        elif isinstance(chunk, FinalChunk):
            self.usage, self.finish = chunk.usage, chunk.finish_reason

    def failed(self, code: str) -> None:
        self.error = code

    def end(self, first_answer: float | None) -> None:
        now = time.monotonic()
        model = self.model
        self.in_flight.dec()
        if first_answer is not None:
            QUEUE_WAIT.labels(model).observe(first_answer - self.published)
        prompt = self.usage.prompt_tokens if self.usage else 0
        completion = self.usage.completion_tokens if self.usage else 0
        if self.usage is not None:
            E2E.labels(model).observe(now - self.published)
            PROMPT_TOKENS.labels(model).inc(prompt)
            COMPLETION_TOKENS.labels(model).inc(completion)
        status = "ok" if self.usage is not None else (self.error or "unfinished")
        if status != "ok":
            ERRORS.labels(model, status if status in _KNOWN_CODES else "other").inc()
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, status))
        ttft = None if self.first_token is None else self.first_token - self.published
        self.span.set_attributes({"chatfabric.status": status, "chatfabric.prompt_tokens": prompt,
                                  "chatfabric.completion_tokens": completion})
        self.span.end()
        REQUEST_LOG.info("request %s model=%s status=%s prompt_tokens=%d completion_tokens=%d ttft=%s duration=%.3f",
                         self.request_id, model, status, prompt, completion,
                         "-" if ttft is None else f"{ttft:.3f}", now - self.published,
                         extra={"request_id": self.request_id, "model": model, "status": status,
                                "prompt_tokens": prompt, "completion_tokens": completion,
                                "ttft": ttft, "duration": now - self.published})


REQUEST_LOG = logging.getLogger("chatfabric.requests")
_KNOWN_CODES = {"timeout", "worker_timeout", "queue_full", "bus_unavailable", "model_unavailable",
                "context_length_exceeded", "invalid_request", "cancelled", "worker_shutdown", "internal_error",
                "client_gone", "stream_gap", "unfinished", "request_too_large"}
