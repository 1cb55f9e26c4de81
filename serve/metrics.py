"""Counters, gauges and histograms written in Prometheus' text exposition format (version 0.0.4).

Small on purpose: the service records requests by route and status, request seconds, batch sizes
and run seconds, faces embedded; gauges are read when scraped. Thread-safe (one lock)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)                         # (route, method, status) -> count
        self.latency = defaultdict(lambda: _Histogram(LATENCY_BUCKETS))  # route -> seconds
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.batch_seconds = _Histogram(LATENCY_BUCKETS)
        self.faces_embedded = 0
        self.enrolled = 0
        self.removed = 0

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1
            self.latency[route].observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)
            self.faces_embedded += size

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges``: name -> (help, value), read by the caller when scraped."""
        out: list[str] = []
        with self._lock:
            _head(out, "facefuse_requests_total", "counter", "HTTP requests answered, by route, method and status")
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(f'facefuse_requests_total{{route="{_esc(route)}",method="{method}",status="{status}"}} {n}')
            _head(out, "facefuse_request_seconds", "histogram", "Time from request to answer, by route")
            for route, h in sorted(self.latency.items()):
                _hist(out, "facefuse_request_seconds", h, f'route="{_esc(route)}"')
            _head(out, "facefuse_batch_faces", "histogram", "Faces per model run (micro-batch size)")
            _hist(out, "facefuse_batch_faces", self.batch_size, "")
            _head(out, "facefuse_batch_seconds", "histogram", "Seconds per model run (preprocessing and network)")
            _hist(out, "facefuse_batch_seconds", self.batch_seconds, "")
            for name, what in (("faces_embedded", "Faces embedded"), ("enrolled", "Faces enrolled"),
                               ("removed", "Gallery rows removed")):
                _head(out, f"facefuse_{name}_total", "counter", what)
                out.append(f"facefuse_{name}_total {getattr(self, name)}")
        for name, (what, value) in gauges.items():
            _head(out, f"facefuse_{name}", "gauge", what)
            out.append(f"facefuse_{name} {_num(value)}")
        return "\n".join(out) + "\n"


def _head(out: list, name: str, kind: str, what: str) -> None:
    out.append(f"# HELP {name} {what}")
    out.append(f"# TYPE {name} {kind}")


def _hist(out: list, name: str, h: _Histogram, labels: str) -> None:
    sep = "," if labels else ""
    for b, c in zip(h.buckets, h.counts):
        out.append(f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}')
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {h.count}')
    lab = f"{{{labels}}}" if labels else ""
    out.append(f"{name}_sum{lab} {_num(h.sum)}")
    out.append(f"{name}_count{lab} {h.count}")


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v)) if abs(v) < 1e15 else repr(float(v))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
