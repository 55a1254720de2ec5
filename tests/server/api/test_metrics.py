"""Prometheus text exposition: well-formed lines, cumulative buckets, request latency tracking."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from server.api.metrics import ServerMetrics
from server.prometheus import Counter, Gauge, Histogram, Registry

SAMPLE_RE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$'
)


def parse(text: str) -> dict[str, float]:
    """Sample lines -> {'name{labels}': value}; asserts every line is well formed."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"malformed sample line: {line!r}"
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in types or base in types, f"sample before its TYPE: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def fake_stats(**kw):
    base = dict(
        num_running=3,
        num_waiting=2,
        kv_cache_usage=0.5,
        prefix_cache_hit_ratio=0.25,
        prompt_tokens_total=100,
        generation_tokens_total=40,
    )
    return SimpleNamespace(**{**base, **kw})


def test_counter_gauge_render():
    reg = Registry()
    c = reg.register(Counter("x_total", "Things.\nMore", ("kind",)))
    g = reg.register(Gauge("y", "A gauge"))
    c.inc(2, {"kind": 'a"b\\c\nd'})
    g.set(1.5)
    text = reg.render()
    assert "# HELP x_total Things.\\nMore" in text
    assert "# TYPE x_total counter" in text
    assert 'x_total{kind="a\\"b\\\\c\\nd"} 2.0' in text
    assert "y 1.5" in text
    parse(text)
    with pytest.raises(ValueError):
        c.inc(-1, {"kind": "a"})
    with pytest.raises(ValueError):
        c.inc(1, {"other": "a"})


def test_histogram_buckets_are_cumulative():
    h = Histogram("lat_seconds", "Latency", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 5.0):
        h.observe(v)
    h.observe(0.2, count=3)
    lines = "\n".join(h.render()) + "\n"
    s = parse(lines)
    assert s['lat_seconds_bucket{le="0.1"}'] == 2
    assert s['lat_seconds_bucket{le="1.0"}'] == 6
    assert s['lat_seconds_bucket{le="+Inf"}'] == 7
    assert s["lat_seconds_count"] == 7
    assert s["lat_seconds_sum"] == pytest.approx(0.05 + 0.1 + 0.5 + 5.0 + 0.6)


def test_server_metrics_names_and_engine_stats():
    m = ServerMetrics()
    s = parse(m.render(fake_stats()))
    assert s["nanoserve_num_requests_running"] == 3
    assert s["nanoserve_num_requests_waiting"] == 2
    assert s["nanoserve_kv_cache_usage_ratio"] == 0.5
    assert s["nanoserve_prefix_cache_hit_ratio"] == 0.25
    assert s["nanoserve_prompt_tokens_total"] == 100
    assert s["nanoserve_generation_tokens_total"] == 40
    assert s['nanoserve_requests_total{finish_reason="stop"}'] == 0
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert s[f"nanoserve_{name}_seconds_count"] == 0
    s = parse(m.render(fake_stats(num_running=0, generation_tokens_total=41)))
    assert s["nanoserve_num_requests_running"] == 0
    assert s["nanoserve_generation_tokens_total"] == 41
    parse(m.render())  # before the engine exists


def test_request_tracker():
    now = [10.0]
    m = ServerMetrics()
    t = m.tracker(clock=lambda: now[0])
    now[0] = 10.5
    t.on_tokens(0, 1)  # first token: TTFT 0.5
    now[0] = 10.7
    t.on_tokens(0, 2)  # two tokens merged in 0.2 s: 2 x 0.1
    t.on_tokens(1, 1)  # first token of choice 1: no inter-token sample
    t.on_tokens(0, 0)
    now[0] = 11.0
    t.on_choice_finished("stop")
    t.on_choice_finished("tool_calls")
    t.on_request_finished()
    t.on_request_finished()  # counted once
    assert m.time_to_first_token_seconds.get_count() == 1
    assert m.time_to_first_token_seconds.get_sum() == pytest.approx(0.5)
    assert m.inter_token_latency_seconds.get_count() == 2
    assert m.inter_token_latency_seconds.get_sum() == pytest.approx(0.2)
    assert m.e2e_request_latency_seconds.get_count() == 1
    assert m.e2e_request_latency_seconds.get_sum() == pytest.approx(1.0)
    assert m.requests_total.get({"finish_reason": "stop"}) == 1
    assert m.requests_total.get({"finish_reason": "tool_calls"}) == 1
    t.on_choice_finished("weird")
    assert m.requests_total.get({"finish_reason": "error"}) == 1
