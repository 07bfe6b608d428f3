"""The server's Prometheus metrics (`GET /metrics`, text exposition format, `prometheus_client`).

Names follow vLLM's (docs.vllm.ai "Production Metrics"; vllm `docs/design/metrics.md`) with our own prefix,
`qwen2_pure:` instead of `vllm:`, and every series carries the `model_name` label as vLLM's do:

    qwen2_pure:requests_total{endpoint, status}      HTTP requests answered, by route and status code
    qwen2_pure:num_requests_running                 requests holding a cache row (gauge)
    qwen2_pure:num_requests_waiting                 requests queued for a row (gauge)
    qwen2_pure:prompt_tokens_total                  prompt tokens admitted (computed + reused from the prompt cache)
    qwen2_pure:generation_tokens_total              tokens generated
    qwen2_pure:prompt_cache_hits_total              requests whose prompt prefix came from the prompt cache
    qwen2_pure:prompt_cache_hit_tokens_total        prompt tokens reused from it (vLLM's prefix_cache_hits counts these)
    qwen2_pure:time_to_first_token_seconds          histogram: submission to the first generated token
    qwen2_pure:time_per_output_token_seconds        histogram: the time between a request's consecutive tokens
    qwen2_pure:e2e_request_latency_seconds          histogram: submission to the last token

Each app has its own `CollectorRegistry` (several apps in one process never collide). The gauges and token
counters are read from the engine when scraped (`Engine.load()`); the histograms are observed from each
request's events, on the engine thread, as they happen. An engine request is one choice: a request with n
choices counts n times in the histograms and the token counters, once in requests_total.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "qwen2_pure:"
# the routes counted by name; any other path is counted as "other" (a scan of random paths adds no series)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
             "/metrics")
# vLLM's bucket bounds (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """What the engine counts itself, read at scrape time."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        load = self.engine.load()
        label = [self.model_name]
        for cls, name, doc, value in (
                (GaugeMetricFamily, "num_requests_running", "Requests holding a cache row.", load["running"]),
                (GaugeMetricFamily, "num_requests_waiting", "Requests waiting for a cache row.", load["waiting"]),
                (CounterMetricFamily, "prompt_tokens", "Prompt tokens admitted (computed or reused).",
                 load["prefill_tokens"] + load["prefix_tokens_reused"]),
                (CounterMetricFamily, "generation_tokens", "Tokens generated.", load["tokens"]),
                (CounterMetricFamily, "prompt_cache_hits", "Requests whose prompt prefix came from the prompt cache.",
                 load["prefix_hits"]),
                (CounterMetricFamily, "prompt_cache_hit_tokens", "Prompt tokens reused from the prompt cache.",
                 load["prefix_tokens_reused"])):
            family = cls(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(label, value)
            yield family


class Metrics:
    """The metrics of one app: `watch` wraps a request's event callback, `CountResponses` counts responses,
    `exposition()` is the body of GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered, by endpoint and status code.",
                                labels + ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first generated token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time between consecutive output tokens.",
                              labels, buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Submission to the last token.",
                             labels, buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def watch(self, on_event: Callable) -> Callable:
        """`on_event` with the request's timings observed first (called on the engine thread). An event that
        covers k > 1 new tokens (text held back until a character is complete) counts each of them as
        1/k of the time since the previous event."""
        start = time.perf_counter()
        state = {"last": None, "tokens": 0}

        def observe(ev) -> None:
            now = time.perf_counter()
            new = ev.completion_tokens - state["tokens"]
            if new > 0:
                if state["last"] is None:
                    self.ttft.observe(now - start)
                    new, state["last"] = new - 1, now
                for _ in range(new):
                    self.tpot.observe((now - state["last"]) / new)
                state["last"], state["tokens"] = now, ev.completion_tokens
            if ev.done and state["last"] is not None:
                self.e2e.observe(now - start)
            on_event(ev)

        return observe



class CountResponses:
    """ASGI middleware counting every HTTP response in `metrics.requests` by endpoint and status (a stream: the
    status it started with). `app.add_middleware(CountResponses, metrics=...)`."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        m = self.metrics

        async def send_counted(message):
            if message["type"] == "http.response.start":
                m.requests.labels(m.model_name, endpoint, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, send_counted)
