"""OpenTelemetry: a tracer provider per process, W3C trace context carried in NATS headers.

Exporters: OTLP when the standard OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_TRACES_EXPORTER=otlp) is
set; a JSON-lines file when the service's TRACE_FILE setting is; otherwise spans are made (so logs
carry trace ids) but go nowhere. Span attributes are ids and codes only, never personal values.
Hand-written NATS propagation (about 20 lines) instead of the NATS instrumentation package: it
floods traces with a span for every JetStream API request, reply inbox and ack, and uses messaging
attribute names from before semantic conventions 1.26.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

_configured = False


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            assert ctx is not None  # typed optional, but every SDK span has one
            lines.append(
                json.dumps(
                    {
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "name": span.name,
                        "kind": span.kind.name,
                        "service": span.resource.attributes.get("service.name"),
                        "attributes": dict(span.attributes or {}),
                        "start": span.start_time,
                        "end": span.end_time,
                    },
                    default=str,
                )
            )
        with self._lock, open(self._path, "a") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS


def configure(service_name: str, trace_file: str = "") -> TracerProvider:
    global _configured
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter_name == "otlp" or (exporter_name != "none" and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if trace_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_file)))
    if not _configured:
        trace.set_tracer_provider(provider)
        _configured = True
    return provider


def tracer(name: str = "csx") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers() -> dict[str, str]:
    """The current trace context as message headers (traceparent, tracestate)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
