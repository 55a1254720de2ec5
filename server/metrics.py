"""Prometheus text exposition (format 0.0.4), written by hand.

Counters, gauges and histograms with optional labels, a registry that renders them, and
`ServerMetrics`: the API layer's latency histograms and request counters plus the engine's
gauges and token counters, read from `engine.stats()` at scrape time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Wide enough for CPU decoding (slow) and GPU decoding (fast) alike.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                  2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                         0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
E2E_BUCKETS_S = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                 50.0, 60.0, 120.0, 240.0, 480.0)  # fmt: skip

FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        assert name.replace("_", "a").replace(":", "a").isalnum(), name
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str] | None) -> tuple[str, ...]:
        labels = labels or {}
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [
            f"# HELP {self.name} {escape_help(self.help_text)}",
            f"# TYPE {self.name} {self.kind}",
        ]

    def render(self) -> list[str]:
        raise NotImplementedError


class _Scalar(_Metric):
    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.label_names:
            self._values[()] = 0.0

    def get(self, labels: dict[str, str] | None = None) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            lines.append(f"{self.name}{format_labels(self.label_names, key)} {format_value(value)}")
        return lines


class Counter(_Scalar):
    """Monotonic count; by convention the name ends in `_total`."""

    kind = "counter"

    def inc(self, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, total: float, labels: dict[str, str] | None = None) -> None:
        """Mirrors a total counted elsewhere (the engine's token counters)."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(total)


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, value: float, labels: dict[str, str] | None = None) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Iterable[float], label_names: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_text, label_names)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        assert self.buckets and not math.isinf(self.buckets[-1]), "+Inf is implicit"
        # per label set: [count per bucket (non-cumulative, last = +Inf)], sum, count
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not self.label_names:
            self._new_series(())

    def _new_series(self, key: tuple[str, ...]) -> tuple[list[int], list[float]]:
        series = ([0] * (len(self.buckets) + 1), [0.0, 0.0])
        self._series[key] = series
        return series

    def observe(self, value: float, labels: dict[str, str] | None = None, count: int = 1) -> None:
        """Records `value` `count` times (one call for many equal observations)."""
        if count <= 0:
            return
        key = self._key(labels)
        index = len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                index = i
                break
        with self._lock:
            series = self._series.get(key) or self._new_series(key)
            series[0][index] += count
            series[1][0] += value * count
            series[1][1] += count

    def get_count(self, labels: dict[str, str] | None = None) -> int:
        series = self._series.get(self._key(labels))
        return int(series[1][1]) if series else 0

    def get_sum(self, labels: dict[str, str] | None = None) -> float:
        series = self._series.get(self._key(labels))
        return series[1][0] if series else 0.0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, (list(c), list(s))) for k, (c, s) in self._series.items())
        for key, (counts, (total, count)) in items:
            cumulative = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += n
                le = f'le="{format_value(bound)}"'
                labels = format_labels(self.label_names, key, le)
                lines.append(f"{self.name}_bucket{labels} {format_value(cumulative)}")
            labels = format_labels(self.label_names, key)
            lines.append(f"{self.name}_sum{labels} {format_value(total)}")
            lines.append(f"{self.name}_count{labels} {format_value(count)}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        assert metric.name not in self._metrics, f"duplicate metric {metric.name}"
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Every metric nanoserve exposes at /metrics."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.num_requests_running = r.register(
            Gauge("nanoserve_num_requests_running", "Requests in the running batch.")
        )
        self.num_requests_waiting = r.register(
            Gauge("nanoserve_num_requests_waiting", "Requests waiting for admission.")
        )
        self.kv_cache_usage_ratio = r.register(
            Gauge(
                "nanoserve_kv_cache_usage_ratio",
                "KV cache blocks held by live requests / all blocks (0..1).",
            )
        )
        self.prefix_cache_hit_ratio = r.register(
            Gauge(
                "nanoserve_prefix_cache_hit_ratio",
                "Prompt tokens found in the prefix cache / prompt tokens looked up (0..1).",
            )
        )
        self.prompt_tokens_total = r.register(
            Counter("nanoserve_prompt_tokens_total", "Prompt tokens computed (prefill).")
        )
        self.generation_tokens_total = r.register(
            Counter("nanoserve_generation_tokens_total", "Tokens generated.")
        )
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

    def update_from_engine(self, stats: object) -> None:
        """Copies an `EngineStats` (duck-typed) into the gauges and token counters."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_ratio.set(stats.kv_cache_usage)
        self.prefix_cache_hit_ratio.set(stats.prefix_cache_hit_ratio)
        self.prompt_tokens_total.set_total(stats.prompt_tokens_total)
        self.generation_tokens_total.set_total(stats.generation_tokens_total)

    def render(self, engine_stats: object | None = None) -> str:
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
