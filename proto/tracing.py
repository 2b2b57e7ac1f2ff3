"""OpenTelemetry tracing for every component, off unless asked for.

`CHATFABRIC_TRACING` (or a component's `--tracing`) turns it on:

- `otlp`: spans go to an OTLP collector configured by the standard `OTEL_*` variables
  (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, ...), over
  the protocol `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` names:
  `http/protobuf` (the default, port 4318) or `grpc` (port 4317, with the
  `opentelemetry-exporter-otlp-proto-grpc` package installed);
- `console`: spans are printed to stderr;
- `file:PATH`: one JSON object per span appended to PATH (what the tests read).

Spans are exported in batches from a thread of the SDK's (every 5 s, `OTEL_BSP_SCHEDULE_DELAY`),
never on the event loop.

`OTEL_SDK_DISABLED=true` wins over all of them. When tracing is off, `tracer()` is
OpenTelemetry's no-op tracer and the W3C `traceparent` still travels (gateways make one when the
client sent none), so a trace can be joined later.

The context crosses the bus in the request's `traceparent` (a field of `GenerationRequest` and a
header of its JetStream message): `inject()` writes the current span's, `extract(traceparent)`
makes the context a worker's spans continue.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

ENV = "CHATFABRIC_TRACING"
_propagator = TraceContextTextMapPropagator()
_configured = False


def setup(service: str, mode: str | None = None) -> bool:
    """Install a tracer provider for this process (`service` names it unless OTEL_SERVICE_NAME
    does); True when tracing is on. Calling it again changes nothing."""
    global _configured
    mode = (mode or os.environ.get(ENV, "")).strip()
    if _configured or not mode or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return _configured
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service)})
    if mode == "otlp":
        exporter = otlp_exporter()
    elif mode == "console":
        exporter = ConsoleSpanExporter()
    elif mode.startswith("file:") and len(mode) > 5:
        exporter = JsonLinesExporter(mode[5:])
    else:
        raise ValueError(f"{ENV}={mode!r}: expected otlp, console or file:PATH")
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    log.info("tracing on (%s) as %s", mode if mode != "otlp" else f"otlp, {otlp_protocol()}", service)
    return True


OTLP_PROTOCOLS = ("http/protobuf", "grpc")


def otlp_protocol() -> str:
    """The protocol the standard variables name (the traces-specific one first)."""
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf").strip()


def otlp_exporter():
    """OpenTelemetry's own OTLP span exporter for `otlp_protocol()`; it reads the endpoint,
    headers, timeout and TLS settings from the `OTEL_EXPORTER_OTLP_*` variables itself."""
    protocol = otlp_protocol()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    elif protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("OTLP over grpc needs its exporter: pip install opentelemetry-exporter-otlp-proto-grpc "
                             "(or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)") from None
    else:
        raise ValueError(f"OTLP protocol {protocol!r} is not one of {', '.join(OTLP_PROTOCOLS)} "
                         "(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL)")
    return OTLPSpanExporter()


def enabled() -> bool:
    """Whether this process records spans: when not, callers skip making them at all."""
    return _configured


def shutdown() -> None:
    """Flush what is buffered (a process about to exit)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject() -> str | None:
    """The current span's `traceparent`, or None when there is no recording span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def traceparent_of(span: trace.Span) -> str | None:
    """The `traceparent` that makes work elsewhere a child of `span`."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def extract(traceparent: str | None) -> otel_context.Context:
    """The context a `traceparent` names (an empty one for None or garbage)."""
    return _propagator.extract({"traceparent": traceparent} if traceparent else {})


class JsonLinesExporter:
    """A span exporter appending one JSON object per span to a file (several processes may
    share it: each line is written whole under O_APPEND)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence) -> "object":
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = "".join(json.dumps(_span_record(span)) + "\n" for span in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _span_record(span) -> dict:
    ctx, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }
