"""The server's metrics: `ServerMetrics` and the per-request `RequestTracker`.

The API layer's latency histograms and request counters, plus the engine's gauges and token
counters read from `engine.stats()` at scrape time; the metric types and the text format are
server/prometheus.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from server.api.engine_client import EngineStats
from server.prometheus import Counter, Gauge, Histogram, Registry

# Seconds. Wide enough for CPU decoding (slow) and GPU decoding (fast) alike.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                  2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                         0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip


E2E_BUCKETS_S = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                 50.0, 60.0, 120.0, 240.0, 480.0)  # fmt: skip


FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")


ENGINE_METRICS = (
    (
        "num_requests_running",
        Gauge,
        "nanoserve_num_requests_running",
        "Requests in the running batch.",
    ),
    (
        "num_requests_waiting",
        Gauge,
        "nanoserve_num_requests_waiting",
        "Requests waiting for admission.",
    ),
    (
        "kv_cache_usage_ratio",
        Gauge,
        "nanoserve_kv_cache_usage_ratio",
        "KV cache blocks held by live requests / all blocks (0..1).",
    ),
    (
        "prefix_cache_hit_ratio",
        Gauge,
        "nanoserve_prefix_cache_hit_ratio",
        "Prompt tokens found in the prefix cache / prompt tokens looked up (0..1).",
    ),
    (
        "prompt_tokens_total",
        Counter,
        "nanoserve_prompt_tokens_total",
        "Prompt tokens computed (prefill).",
    ),
    ("generation_tokens_total", Counter, "nanoserve_generation_tokens_total", "Tokens generated."),
)


class ServerMetrics:
    """Every metric nanoserve exposes at /metrics."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        # The engine's gauges and token counters: (attribute, type, name, help).
        for attr, kind, name, help_text in ENGINE_METRICS:
            setattr(self, attr, r.register(kind(name, help_text)))
        self.requests_total = r.register(
            Counter(
                "nanoserve_requests_total",
                "Generation requests finished, by finish reason (per choice).",
                ("finish_reason",),
            )
        )
        for reason in FINISH_REASONS:
            self.requests_total.inc(0, {"finish_reason": reason})
        self.time_to_first_token_seconds = r.register(
            Histogram(
                "nanoserve_time_to_first_token_seconds",
                "Time from request arrival to its first generated token.",
                TTFT_BUCKETS_S,
            )
        )
        self.inter_token_latency_seconds = r.register(
            Histogram(
                "nanoserve_inter_token_latency_seconds",
                "Time between consecutive generated tokens of one choice.",
                INTER_TOKEN_BUCKETS_S,
            )
        )
        self.e2e_request_latency_seconds = r.register(
            Histogram(
                "nanoserve_e2e_request_latency_seconds",
                "Time from request arrival to its last token.",
                E2E_BUCKETS_S,
            )
        )

    def update_from_engine(self, stats: EngineStats) -> None:
        """Copies the engine's stats into the gauges and token counters."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_ratio.set(stats.kv_cache_usage)
        self.prefix_cache_hit_ratio.set(stats.prefix_cache_hit_ratio)
        self.prompt_tokens_total.set_total(stats.prompt_tokens_total)
        self.generation_tokens_total.set_total(stats.generation_tokens_total)

    def render(self, engine_stats: EngineStats | None = None) -> str:
        if engine_stats is not None:
            self.update_from_engine(engine_stats)
        return self.registry.render()

    def tracker(self, clock: Callable[[], float] = time.monotonic) -> RequestTracker:
        return RequestTracker(self, clock)


class RequestTracker:
    """Latency bookkeeping of one request (all its choices), fed by the API handlers."""

    def __init__(self, metrics: ServerMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self.arrival_s = clock()
        self.first_token_s: float | None = None
        self._last_token_s: dict[int, float] = {}
        self._done = False

    def on_tokens(self, choice: int, num_tokens: int) -> None:
        """`num_tokens` new tokens of `choice` arrived now (merged deltas carry several)."""
        if num_tokens <= 0:
            return
        now = self.clock()
        if self.first_token_s is None:
            self.first_token_s = now
            self.metrics.time_to_first_token_seconds.observe(now - self.arrival_s)
        last = self._last_token_s.get(choice)
        if last is not None:
            # a merged delta spreads its wait evenly over its tokens
            gap = (now - last) / num_tokens
            self.metrics.inter_token_latency_seconds.observe(gap, count=num_tokens)
        self._last_token_s[choice] = now

    def on_choice_finished(self, finish_reason: str) -> None:
        reason = finish_reason if finish_reason in FINISH_REASONS else "error"
        self.metrics.requests_total.inc(1, {"finish_reason": reason})

    def on_request_finished(self) -> None:
        if not self._done:
            self._done = True
            self.metrics.e2e_request_latency_seconds.observe(self.clock() - self.arrival_s)
