"""Prometheus text-format metrics kept per app (no global registry): requests, latency, batch sizes, errors."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{edge}"}} {c}' for edge, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        tail = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{tail} {self.total:.6f}", f"{name}_count{tail} {self.n}"]
        return out


class Telemetry:
    """Counters and histograms updated from the event loop and the inference thread (hence the lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)   # (route, status) -> count
        self.errors = defaultdict(int)     # code -> count
        self.images = defaultdict(int)     # outcome -> count
        self.latency = defaultdict(lambda: Histogram(LATENCY_BUCKETS))
        self.batches = Histogram(BATCH_BUCKETS)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency[route].observe(seconds)

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def image(self, outcome: str) -> None:
        with self._lock:
            self.images[outcome] += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def render(self) -> str:
        with self._lock:
            out = ["# HELP bonefrac_requests_total HTTP requests by route and status.",
                   "# TYPE bonefrac_requests_total counter"]
            out += [f'bonefrac_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            out += ["# HELP bonefrac_request_seconds Request latency.", "# TYPE bonefrac_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                out += hist.lines("bonefrac_request_seconds", f'route="{route}"')
            out += ["# HELP bonefrac_batch_size Images per model call.", "# TYPE bonefrac_batch_size histogram"]
            out += self.batches.lines("bonefrac_batch_size")
            out += ["# HELP bonefrac_errors_total Refused requests, and files refused within one, by error code.",
                    "# TYPE bonefrac_errors_total counter"]
            out += [f'bonefrac_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
            out += ["# HELP bonefrac_images_total Images by outcome.", "# TYPE bonefrac_images_total counter"]
            out += [f'bonefrac_images_total{{outcome="{o}"}} {n}' for o, n in sorted(self.images.items())]
        return "\n".join(out) + "\n"
