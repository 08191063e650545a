"""What a router measures of its load: arrivals and finished requests' token counts over a
sliding window (`LoadCounter`), and the engine gauges it reads from each replica's /metrics
(`engine_gauges`). `GET /router/load` returns both; the controller's autoscaler reads it.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from typing import Any

# The engine's /metrics gauges the autoscaler reads (vLLM's names), as `engines` rows name them.
ENGINE_GAUGES = {
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:num_requests_running": "num_requests_running",
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)", re.M)
KEEP_S = 600.0  # load history the router keeps


class LoadCounter:
    """Arrivals and finished requests' token counts over a sliding window."""

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._arrivals: deque[float] = deque()
        self._done: deque[tuple[float, int, int, float]] = deque()  # time, in, out, first byte

    def arrived(self) -> None:
        with self._lock:
            self._arrivals.append(time.time())
            self._trim()

    def finished(self, input_tokens: int, output_tokens: int, first_byte_s: float) -> None:
        with self._lock:
            self._done.append((time.time(), input_tokens, output_tokens, first_byte_s))
            self._trim()

    def _trim(self) -> None:
        cut = time.time() - KEEP_S
        while self._arrivals and self._arrivals[0] < cut:
            self._arrivals.popleft()
        while self._done and self._done[0][0] < cut:
            self._done.popleft()

    def window(self, window_s: float) -> dict[str, Any]:
        now = time.time()
        span = max(1e-3, min(window_s, KEEP_S, now - self.started))
        with self._lock:
            arrivals = sum(t >= now - span for t in self._arrivals)
            done = [(i, o, f) for t, i, o, f in self._done if t >= now - span]
        n = len(done)
        firsts = sorted(f for _, _, f in done)
        return {
            "window_s": round(span, 3),
            "arrivals": arrivals,
            "rate": arrivals / span,
            "completed": n,
            "input_tokens": sum(i for i, _, _ in done) / n if n else 0.0,
            "output_tokens": sum(o for _, o, _ in done) / n if n else 0.0,
            # time to the first byte of the response (of a stream: about the TTFT)
            "ttft_s": {f"p{q}": firsts[min(n - 1, int(q / 100 * n))] for q in (50, 90, 99)}
            if n
            else {},
        }


def engine_gauges(text: str) -> dict[str, float]:
    """The ENGINE_GAUGES of a Prometheus text page, summed over label sets (KV use: the
    highest); a gauge the page lacks is left out."""
    out: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        key = ENGINE_GAUGES.get(name)
        try:
            v = float(value)
        except ValueError:
            continue
        if key == "kv_cache_usage_perc":
            out[key] = max(out.get(key, 0.0), v)
        elif key is not None:
            out[key] = out.get(key, 0.0) + v
    return out
