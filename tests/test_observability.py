"""Metrics and traces. Prometheus: the gateway's /metrics after a few requests (in this test's
event loop, real nats-server, synthetic worker) counts exactly what was sent; a worker started
with --metrics-port serves its own. Traces: a gateway and a worker as separate processes, each
writing its spans to a file, make one trace of one request, parented correctly. JSON logs."""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for
from test_inprocess import fabric, models, nats_server, wait_until  # noqa: F401  (the in-process tier's fixtures)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: dict, name: str, **labels) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(base_url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/metrics") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            return samples(await resp.text())


async def test_metrics_count_what_was_sent(fabric):  # noqa: F811
    client, _, _ = fabric
    base = str(client.base_url).removesuffix("/v1/")
    before = await scrape(base)
    usage = 0
    for _ in range(2):
        reply = await client.chat.completions.create(model="syn", max_tokens=5,
                                                     messages=[{"role": "user", "content": "hi"}])
        usage += reply.usage.completion_tokens
    stream = await client.chat.completions.create(model="syn", max_tokens=4, stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "hi"}])
    async for chunk in stream:
        if chunk.usage:
            usage += chunk.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    after = await scrape(base)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    assert delta("chatfabric_gateway_requests_total", route=route, model="syn", status="200") == 3
    assert delta("chatfabric_gateway_requests_total", route=route, model="", status="404") == 1
    assert not any("no-such-model" in str(key) for key in after)  # unknown names never become labels
    assert delta("chatfabric_gateway_completion_tokens_total", model="syn") == usage == 14
    assert delta("chatfabric_gateway_time_to_first_token_seconds_count", model="syn") == 3
    assert delta("chatfabric_gateway_request_duration_seconds_count", model="syn") == 3
    assert delta("chatfabric_gateway_queue_wait_seconds_count", model="syn") == 3
    assert value(after, "chatfabric_gateway_streams_in_flight", model="syn") == 0
    assert value(after, "chatfabric_workers_alive", model="syn") == 1
    assert ("chatfabric_queue_depth", (("model", "syn"),)) in after
    # the worker runs in this process: its metrics are on the same page
    assert delta("chatfabric_worker_generated_tokens_total", model="syn") == usage
    assert delta("chatfabric_worker_requests_total", model="syn", outcome="ok") == 3
    assert value(after, "chatfabric_worker_requests_running", model="syn") == 0


async def test_the_grafana_dashboard_reads_metrics_that_exist(fabric):  # noqa: F811
    from pathlib import Path

    dashboard = Path(__file__).resolve().parent.parent / "deploy/observability/grafana/dashboards/chatfabric.json"
    panels = json.loads(dashboard.read_text())["panels"]
    used = {name for panel in panels for target in panel.get("targets", [])
            for name in re.findall(r"chatfabric_[a-z_]+", target.get("expr", ""))}
    assert used, "the dashboard queries no chatfabric metric"
    client, _, _ = fabric
    await wait_until(lambda: models(client), {"syn"})  # the loop stood still while sync tests ran
    await client.chat.completions.create(model="syn", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(str(client.base_url).removesuffix("/v1/") + "/metrics") as resp:
            families = list(text_string_to_metric_families(await resp.text()))
    # a labelled series appears once it has a value; its family is declared from the start
    exported = {name for f in families for name in (f.name, f"{f.name}_total", *(s.name for s in f.samples))}
    assert used <= exported, used - exported


def test_a_worker_serves_its_metrics_on_its_port(tmp_path, model_dir):
    from conftest import make_fabric
    from chatfabric.proto.embedded import free_port

    fab = make_fabric(model_dir, tmp_path)
    try:
        _, base = fab.gateway()
        port = free_port()
        fab.worker("metered", "--backend", "synthetic", "--metrics-port", str(port))
        fab.wait_workers(base, "metered", 1)
        body = json.dumps({"model": "metered", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            tokens = json.loads(resp.read())["usage"]["completion_tokens"]
        page = samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
        assert value(page, "chatfabric_worker_generated_tokens_total", model="metered") == tokens
        assert value(page, "chatfabric_worker_requests_total", model="metered", outcome="ok") == 1
    finally:
        fab.close()


def test_one_request_is_one_trace_across_gateway_and_worker(tmp_path, model_dir):
    from conftest import make_fabric

    fab = make_fabric(model_dir, tmp_path)
    spans_file = tmp_path / "spans.jsonl"
    try:
        _, base = fab.gateway("--tracing", f"file:{spans_file}")
        fab.worker("traced", "--backend", "synthetic", "--tracing", f"file:{spans_file}")
        fab.wait_workers(base, "traced", 1)
        trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        body = json.dumps({"model": "traced", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(),
                                         {"Content-Type": "application/json",
                                          "traceparent": f"00-{trace_id}-{client_span}-01"})
        urllib.request.urlopen(request, timeout=60).read()

        def spans():
            if not spans_file.exists():
                return None
            found = {s["name"]: s for s in map(json.loads, spans_file.read_text().splitlines())
                     if s["trace_id"] == trace_id}
            wanted = {"POST /v1/chat/completions", "generation", "jetstream.queued", "worker.generate",
                      "prefill", "decode"}
            return found if wanted <= found.keys() else None

        found = wait_for(spans, 30, "both processes' spans")
    finally:
        fab.close()
    server, generation = found["POST /v1/chat/completions"], found["generation"]
    assert server["service"] == "chatfabric-gateway" and found["worker.generate"]["service"] == "chatfabric-worker"
    assert server["parent_id"] == client_span
    assert generation["parent_id"] == server["span_id"]
    assert found["worker.generate"]["parent_id"] == generation["span_id"]
    assert found["jetstream.queued"]["parent_id"] == generation["span_id"]
    assert found["prefill"]["parent_id"] == found["decode"]["parent_id"] == found["worker.generate"]["span_id"]
    assert found["worker.generate"]["attributes"]["chatfabric.completion_tokens"] == 3
    assert found["prefill"]["end"] <= found["decode"]["start"]


class OtlpReceiver:
    """A small OTLP/HTTP receiver (what a collector's `otlp` receiver does on :4318): POST
    /v1/traces with a protobuf ExportTraceServiceRequest; the spans it got, by name."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                             ExportTraceServiceResponse)
        receiver = self
        self.spans: list[tuple[str, object]] = []  # (service name, span)
        self.content_types: set[str] = set()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.content_types.add(self.headers["Content-Type"])
                ok = self.path == "/v1/traces"
                if ok:
                    request = ExportTraceServiceRequest.FromString(body)
                    for resource_spans in request.resource_spans:
                        service = next(a.value.string_value for a in resource_spans.resource.attributes
                                       if a.key == "service.name")
                        for scope in resource_spans.scope_spans:
                            receiver.spans.extend((service, span) for span in scope.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_otlp_export_reaches_an_otlp_http_receiver(tmp_path, model_dir):
    """`--tracing otlp` with the standard variables: the gateway's spans of one request arrive,
    as protobuf over HTTP, at the endpoint OTEL_EXPORTER_OTLP_ENDPOINT names."""
    from conftest import make_fabric

    receiver = OtlpReceiver()
    fab = make_fabric(model_dir, tmp_path)
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SDK_DISABLED",
                 "CHATFABRIC_TRACING", "OTEL_SERVICE_NAME"):
        fab.env.pop(name, None)
    fab.env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_BSP_SCHEDULE_DELAY="200")
    try:
        _, base = fab.gateway("--tracing", "otlp")
        fab.worker("exported", "--backend", "synthetic")
        fab.wait_workers(base, "exported", 1)
        trace_id, client_span = "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"
        body = json.dumps({"model": "exported", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(),
                                         {"Content-Type": "application/json",
                                          "traceparent": f"00-{trace_id}-{client_span}-01"})
        urllib.request.urlopen(request, timeout=60).read()

        def arrived():
            found = {span.name: (service, span) for service, span in list(receiver.spans)
                     if span.trace_id.hex() == trace_id}
            return found if {"POST /v1/chat/completions", "generation"} <= found.keys() else None

        found = wait_for(arrived, 30, "the gateway's spans at the OTLP receiver")
    finally:
        fab.close()
        receiver.close()
    (service, server), (_, generation) = found["POST /v1/chat/completions"], found["generation"]
    assert service == "chatfabric-gateway" and receiver.content_types == {"application/x-protobuf"}
    assert server.parent_span_id.hex() == client_span
    assert generation.parent_span_id == server.span_id


def test_otlp_over_grpc_without_its_exporter_is_a_clear_error(monkeypatch):
    from chatfabric.proto import tracing

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install opentelemetry-exporter-otlp-proto-grpc"):
            tracing.otlp_exporter()
    else:
        assert type(tracing.otlp_exporter()).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="not one of http/protobuf, grpc"):
        tracing.otlp_exporter()


def test_json_logs_carry_one_line_per_request(tmp_path, model_dir):
    from conftest import make_fabric

    fab = make_fabric(model_dir, tmp_path)
    try:
        gateway, base = fab.gateway("--log-format", "json")
        fab.worker("logged", "--backend", "synthetic")
        fab.wait_workers(base, "logged", 1)
        body = json.dumps({"model": "logged", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=60).read()

        def request_line():
            for line in gateway.log().splitlines():
                if line.startswith("{") and json.loads(line).get("logger") == "chatfabric.requests":
                    return json.loads(line)
            return None

        entry = wait_for(request_line, 10, "the request's log line")
    finally:
        fab.close()
    assert entry["model"] == "logged" and entry["status"] == "ok" and entry["completion_tokens"] == 2
    assert re.fullmatch(r"[0-9a-f]{32}", entry["request_id"]) and entry["duration"] >= entry["ttft"] > 0


