"""Prometheus metrics of the engine server, under two prefixes.

`vllm:` series carry vLLM's own names and labels (`model_name`; `finished_reason` on
`vllm:request_success_total`), so vLLM dashboards and alerts work unchanged. `engine:` series
carry the same figures under the engine's names, plus what vLLM has no name for (requests
pending a first token, prefix-cache hit rate, outcomes `error` and `rejected`).

Per-request figures (outcomes, TTFT, TPOT, end-to-end latency, token counts) are observed by the
server as requests finish; engine state (queue lengths, KV usage, prefix hit rate, preemptions)
is read from the latest snapshot the engine loop took, at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only add noise to every scrape

OUTCOMES = ("stop", "length", "abort", "error", "rejected")
FINISHED_REASONS = ("stop", "length", "abort")  # vllm:request_success_total's label values
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS = (
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
)


@dataclass
class EngineStats:
    """What the engine loop last saw (plain numbers, safe to read from any thread)."""

    num_running: int = 0
    num_waiting: int = 0
    num_pending: int = 0  # accepted by the server, no first token yet (the bounded queue)
    kv_usage: float = 0.0  # fraction of KV blocks in use
    prefix_hit_rate: float = 0.0
    num_preemptions: int = 0


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        labels = ["model_name"]
        gauges = (
            ("engine:num_requests_running", "Requests in the running batch.", s.num_running),
            ("engine:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            (
                "engine:num_requests_pending",
                "Requests accepted by the server that have no first token yet.",
                s.num_pending,
            ),
            ("engine:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", s.kv_usage),
            ("vllm:num_requests_running", "Requests in the running batch.", s.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage (vLLM's older name).", s.kv_usage),
            (
                "engine:prefix_cache_hit_rate",
                "Prefix-cache hit rate over prompt tokens (0-1).",
                s.prefix_hit_rate,
            ),
        )
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self._model], float(value))
            yield g
        for prefix in ("engine", "vllm"):
            c = CounterMetricFamily(
                f"{prefix}:num_preemptions", "Preemptions (by recompute).", labels=labels
            )
            c.add_metric([self._model], float(s.num_preemptions))
            yield c


class ServerMetrics:
    """The server's metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        kw = {"labelnames": ["model_name"], "registry": self.registry}
        self.requests = Counter(
            "engine:requests",
            "Finished requests by outcome.",
            labelnames=["model_name", "outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("engine:prompt_tokens", "Prompt tokens processed.", **kw)
        self.generation_tokens = Counter("engine:generation_tokens", "Tokens generated.", **kw)
        self.ttft = Histogram(
            "engine:time_to_first_token_seconds",
            "Time to first token.",
            buckets=TTFT_BUCKETS,
            **kw,
        )
        self.tpot = Histogram(
            "engine:time_per_output_token_seconds",
            "Mean time per output token after the first.",
            buckets=TPOT_BUCKETS,
            **kw,
        )
        self.e2e = Histogram(
            "engine:e2e_request_latency_seconds",
            "Request latency from arrival to last token.",
            buckets=E2E_BUCKETS,
            **kw,
        )
        self.vllm = _VLLMSeries(self.registry, model_name)
        # The labelled children, looked up once (labels() takes a lock and builds a key per
        # call); every outcome exported from the start, so dashboards see zeros, not gaps.
        self._by_outcome = {o: self.requests.labels(model_name, o) for o in OUTCOMES}
        self._prompt_tokens = self.prompt_tokens.labels(model_name)
        self._generation_tokens = self.generation_tokens.labels(model_name)
        self._ttft = self.ttft.labels(model_name)
        self._tpot = self.tpot.labels(model_name)
        self._e2e = self.e2e.labels(model_name)
        self.registry.register(_EngineCollector(stats, model_name))

    def observe_finished(
        self,
        outcome: str,
        prompt_tokens: int,
        output_lens: list[int],
        ttft: float | None,
        e2e: float,
    ) -> None:
        """Record one finished engine request (outcome: stop | length | abort | error).

        output_lens holds the token count of each of its n samples; TPOT is taken over the
        longest, the one that decided the request's end-to-end time.
        """
        self._by_outcome[outcome].inc()
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(sum(output_lens))
        self._e2e.observe(e2e)
        longest = max(output_lens, default=0)
        tpot = None
        if ttft is not None:
            self._ttft.observe(ttft)
            if longest > 1:
                tpot = (e2e - ttft) / (longest - 1)
                self._tpot.observe(tpot)
        self.vllm.observe(outcome, prompt_tokens, sum(output_lens), ttft, tpot, e2e)

    def observe_rejected(self) -> None:
        self._by_outcome["rejected"].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _VLLMSeries:
    """The per-request series under vLLM's names, in the server's registry."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        kw = {"labelnames": ["model_name"], "registry": registry}
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labelnames=["model_name", "finished_reason"],
            registry=registry,
        )
        self.success = {r: success.labels(model_name, r) for r in FINISHED_REASONS}
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", **kw
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", **kw
        ).labels(model_name)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            buckets=TTFT_BUCKETS,
            **kw,
        ).labels(model_name)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            buckets=TPOT_BUCKETS,
            **kw,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            buckets=E2E_BUCKETS,
            **kw,
        ).labels(model_name)

    def observe(
        self,
        outcome: str,
        prompt_tokens: int,
        generated: int,
        ttft: float | None,
        tpot: float | None,
        e2e: float,
    ) -> None:
        if outcome in self.success:
            self.success[outcome].inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
