"""Prometheus metric types (counter, gauge, histogram) and the text exposition format 0.0.4."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
