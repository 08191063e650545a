"""Live series of a deployment for the dashboard's charts: load, latency, KV cache, queues.

Each sample reads, server-side, the deployment's router (`GET /router/load`: arrivals and
in-flight requests per replica) and every engine's Prometheus `/metrics` (KV-cache use,
running and waiting requests, the TTFT and TPOT histograms), sending the replicas' key: the
browser never talks to a replica. A deployment's samples are taken when its series is asked
for, at most one per `MIN_INTERVAL_S`, and kept for `KEEP_S`. A point's TTFT/TPOT p50/p99 are
histogram quantiles (linear within a bucket, as Prometheus's `histogram_quantile`) over the
requests the engines finished in the last `WINDOW_S` (since the engine started, for the
first sample); null where none finished.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

WINDOW_S = 30.0  # rates and latency percentiles are over this window
MIN_INTERVAL_S = 2.0
KEEP_S = 600.0
SCRAPE_TIMEOUT_S = 2.0
QUANTILES = (50, 99)

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_GAUGES = {
    "engine:kv_cache_usage_perc": "kv_cache",
    "engine:num_requests_running": "running",
    "engine:num_requests_waiting": "waiting",
}
_HISTOGRAMS = {
    "engine:time_to_first_token_seconds_bucket": "ttft",
    "engine:time_per_output_token_seconds_bucket": "tpot",
}

Buckets = dict[float, float]  # upper bound (le) -> cumulative count


@dataclass
class EngineScrape:
    """What one engine's /metrics said: gauges and cumulative histogram buckets."""

    gauges: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Buckets] = field(default_factory=dict)


def parse_metrics(text: str) -> EngineScrape:
    """The dashboard's figures from Prometheus text exposition (other series ignored)."""
    out = EngineScrape()
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        name, labels, value = m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])
        if name in _GAUGES:
            out.gauges[_GAUGES[name]] = value
        elif name in _HISTOGRAMS and "le" in labels:
            out.histograms.setdefault(_HISTOGRAMS[name], {})[float(labels["le"])] = value
    return out


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile (0..1) of a cumulative histogram; None when it counted nothing."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lo, below = q * total, 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lo  # beyond the last finite bound: its bound, as Prometheus does
            if count == below:
                return le
            return lo + (le - lo) * (rank - below) / (count - below)
        lo, below = le, count
    return lo


def _delta(now: Buckets, then: Buckets | None) -> Buckets:
    """Counts between two scrapes; a restarted engine (counts fell) starts from zero."""
    if not then or any(now.get(le, 0.0) < c for le, c in then.items()):
        return dict(now)
    return {le: c - then.get(le, 0.0) for le, c in now.items()}


def _sum(parts: list[Buckets]) -> Buckets:
    out: Buckets = {}
    for b in parts:
        for le, c in b.items():
            out[le] = out.get(le, 0.0) + c
    return out


@dataclass
class Sample:
    time: float
    load: dict[str, Any] | None  # the router's /router/load answer (None: it did not answer)
    engines: dict[str, EngineScrape]  # engine name -> its scrape (absent: did not answer)


def engines_of(replicas: list[Any]) -> dict[str, tuple[str, Any]]:
    """Engine name -> (base URL, replica) of the replicas that run one (data parallel:
    `name/i`, as the router names them)."""
    out = {}
    for rep in replicas:
        if not rep.url:
            continue
        for i, url in enumerate(rep.engine_urls):
            out[rep.name if i == 0 else f"{rep.name}/{i}"] = (url.rstrip("/"), rep)
    return out


async def scrape_engines(engines: dict[str, tuple[str, Any]]) -> dict[str, EngineScrape]:
    """Every engine's /metrics at once, each with its replica's key over its pinned
    certificate (`replica_auth`); one that does not answer 200 is left out."""
    from skybroker.replica_auth import replica_auth

    async def one(url: str, rep: Any) -> EngineScrape | None:
        auth = replica_auth(rep)
        try:
            async with httpx.AsyncClient(
                timeout=SCRAPE_TIMEOUT_S, headers=auth.headers, verify=auth.verify()
            ) as http:
                r = await http.get(f"{url}/metrics")
        except httpx.HTTPError:
            return None
        return parse_metrics(r.text) if r.status_code == 200 else None

    got = await asyncio.gather(*(one(url, rep) for url, rep in engines.values()))
    return {name: s for name, s in zip(engines, got, strict=True) if s is not None}


class Series:
    """One deployment's samples, oldest first, and the chart points made from them."""

    def __init__(self) -> None:
        self.samples: deque[Sample] = deque()
        self.lock = asyncio.Lock()

    def due(self, now: float) -> bool:
        return not self.samples or now - self.samples[-1].time >= MIN_INTERVAL_S

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        while self.samples and self.samples[0].time < sample.time - KEEP_S:
            self.samples.popleft()

    def _baseline(self, i: int) -> Sample | None:
        """The latest sample at least WINDOW_S before sample i (else the oldest before it)."""
        cut = self.samples[i].time - WINDOW_S
        before = [s for s in list(self.samples)[:i] if s.time <= cut]
        if before:
            return before[-1]
        return self.samples[0] if i > 0 else None

    def point(self, i: int) -> dict[str, Any]:
        s, base = self.samples[i], self._baseline(i)
        latency: dict[str, dict[str, float | None]] = {}
        for hist in ("ttft", "tpot"):
            parts = [
                _delta(e.histograms.get(hist, {}), _old(base, name, hist))
                for name, e in s.engines.items()
            ]
            total = _sum(parts)
            latency[hist] = {f"p{q}": _round(histogram_quantile(q / 100, total)) for q in QUANTILES}
        in_flight = (s.load or {}).get("in_flight", {})
        replicas = {
            name: {**{k: e.gauges.get(k) for k in _GAUGES.values()},
                   "in_flight": in_flight.get(name)}
            for name, e in s.engines.items()
        }  # fmt: skip
        return {
            "time": round(s.time, 3),
            "rate": _round((s.load or {}).get("rate")),
            "ttft_s": latency["ttft"],
            "tpot_s": latency["tpot"],
            "replicas": replicas,
        }

    def points(self) -> list[dict[str, Any]]:
        return [self.point(i) for i in range(len(self.samples))]


def _old(base: Sample | None, engine: str, hist: str) -> Buckets | None:
    if base is None or engine not in base.engines:
        return None
    return base.engines[engine].histograms.get(hist)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


async def take_sample(controller: Any, name: str) -> Sample:
    """Read the router and the engines of deployment `name` now."""
    from fastapi.concurrency import run_in_threadpool

    from skybroker.state import ReplicaStatus

    reps = await run_in_threadpool(controller.replicas, name)  # the store may be remote
    running = [r for r in reps if r.status in (ReplicaStatus.READY, ReplicaStatus.NOT_READY,
                                               ReplicaStatus.DRAINING)]  # fmt: skip
    load = await run_in_threadpool(controller.routers.load, name, WINDOW_S)
    engines = await scrape_engines(engines_of(running))
    return Sample(time.time(), load, engines)
