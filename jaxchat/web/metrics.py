"""The server's Prometheus metrics (`/metrics`, text exposition format, via prometheus_client).

Per app, in a registry of its own (tests build many apps in one process): requests by route and status, prompt and
completion tokens served, rate-limit refusals, and histograms of time to first token, time per output token and request
duration. The generation loop's own state (queue depth, active rows, tokens generated, decode steps, ...) is read from
the backend's `metrics()` at scrape time by a collector, so it is never stale and never double-counted.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/metrics.json", "/health", "/",
                "/openapi.json", "/docs")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

# backend.metrics() key -> (metric name, help); gauges read as they are, counters as totals
GAUGES = {
    "queue_depth": ("jaxchat_queue_depth", "requests waiting for a row"),
    "active_rows": ("jaxchat_active_rows", "rows being decoded"),
    "max_rows": ("jaxchat_max_rows", "rows the batcher decodes together at most"),
    "queue_size": ("jaxchat_queue_size", "requests that may wait before the server answers 429"),
    "peak_active_rows": ("jaxchat_peak_active_rows", "most rows decoded together since start"),
    "tokens_per_s": ("jaxchat_tokens_per_second", "tokens generated per second over the last 10 s"),
}
COUNTERS = {
    "tokens_generated": ("jaxchat_tokens_generated", "tokens the model produced, every row"),
    "decode_steps": ("jaxchat_decode_steps", "batched decode steps"),
    "requests_completed": ("jaxchat_generations_completed", "choices that ran to their end"),
    "requests_cancelled": ("jaxchat_generations_cancelled", "choices whose client went away"),
    "requests_failed": ("jaxchat_generations_failed", "choices ended by an error"),
    "requests_cut_by_shutdown": ("jaxchat_generations_cut_by_shutdown", "choices ended at the drain timeout"),
    "requests_rejected_queue_full": ("jaxchat_generations_rejected_queue_full", "choices refused: queue full"),
}


class _BackendCollector:
    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        m = self.backend.metrics()
        for key, (name, doc) in GAUGES.items():
            if m.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(m[key]))
        for key, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=float(m.get(key) or 0))
        status = m.get("status", "unknown")
        ready = GaugeMetricFamily("jaxchat_status", "the generation loop's state (1 for the current one)",
                                  labels=["status"])
        for s in ("warming_up", "ok", "draining", "failed"):
            ready.add_metric([s], 1.0 if status == s else 0.0)
        yield ready


class ServerMetrics:
    def __init__(self, backend):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxchat_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.duration = Histogram("jaxchat_request_duration_seconds", "HTTP request duration, to the last byte",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("jaxchat_time_to_first_token_seconds", "submission to first token, per choice",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jaxchat_time_per_output_token_seconds", "after the first token, per choice",
                              buckets=PER_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("jaxchat_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("jaxchat_completion_tokens", "completion tokens delivered", registry=r)
        self.rate_limited = Counter("jaxchat_rate_limited", "requests refused by the per-key rate limits",
                                    registry=r)
        r.register(_BackendCollector(backend))

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in KNOWN_ROUTES else "other"  # fuzzers and scanners must not create label values
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)

    def observe_choice(self, ttft_s: float, elapsed_s: float, completion_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.completion_tokens.inc(completion_tokens)
        if completion_tokens > 1:
            self.tpot.observe((elapsed_s - ttft_s) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
