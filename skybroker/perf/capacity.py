"""The highest request rate one replica sustains within the SLO, by simulation + bisection.

For a step-time model, a scheduler config and one request class, `max_rate` simulates
`num_requests` Poisson arrivals at a rate and checks the TTFT and TPOT percentiles against the
SLO. The saturated throughput (all requests at t=0) bounds the search from above; bisection
narrows the rate to `rel_tol`. Results are cached in memory and on disk
($SKYBROKER_HOME/perf_cache.json; SKYBROKER_PERF_CACHE=0 turns the disk cache off), keyed by
everything that decides them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np

from skybroker.perf.roofline import skybroker_home
from skybroker.perf.simulator import SchedulerConfig, StepTimeModel, StopRule, simulate
from skybroker.perf.workload import RequestClass


@dataclass(frozen=True, slots=True)
class SLOTarget:
    ttft_s: float
    tpot_s: float
    percentile: float = 99.0


@dataclass(frozen=True, slots=True)
class CapacityResult:
    rate: float  # requests/s one replica sustains within the SLO (0 if none)
    ttft_s: float  # at that rate, at the SLO percentile
    tpot_s: float


CACHE_VERSION = 4  # bump when the search or the simulator changes what they answer
# A search on more requests than this brackets the capacity by a search on this many first:
# its feasible probes are the expensive ones, and the bracket saves most of them.
COARSE_REQUESTS = 80
LATENCY_TOL = 0.02  # a feasible rate whose latency is within 2% of the SLO is the capacity

_memo: dict[str, CapacityResult] = {}
_dirty: set[str] = set()  # computed here, not yet on disk
_lock = threading.Lock()


def _cache_path() -> Path:
    return skybroker_home() / "perf_cache.json"


def _disk_enabled() -> bool:
    return os.environ.get("SKYBROKER_PERF_CACHE", "1") != "0"


def _load_disk() -> dict[str, list[float]]:
    p = _cache_path()
    if not _disk_enabled() or not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _save_disk(entries: dict[str, CapacityResult]) -> None:
    if not _disk_enabled() or not entries:
        return
    data = _load_disk()
    data.update({k: [r.rate, r.ttft_s, r.tpot_s] for k, r in entries.items()})
    p = _cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(p)


def _compute_digest(obj: object) -> str:
    ident = getattr(obj, "cache_key", None) or (asdict(obj) if is_dataclass(obj) else repr(obj))
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


_cached_digest = functools.lru_cache(maxsize=1024)(_compute_digest)


def _digest(obj: object) -> str:
    """Stable digest of a model, config or class; memoized for hashable (frozen) ones."""
    try:
        return _cached_digest(obj)
    except TypeError:  # e.g. a profile model holding dicts
        return _compute_digest(obj)


def _key(model: StepTimeModel, cfg: SchedulerConfig, cls: RequestClass, slo: SLOTarget,
         num_requests: int, seed: int, rel_tol: float) -> str:  # fmt: skip
    blob = json.dumps([CACHE_VERSION, _digest(model), _digest(cfg), _digest(cls), asdict(slo),
                       num_requests, seed, rel_tol])  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _requests(cls: RequestClass, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(cls.input_lens), n)
    gaps = rng.exponential(1.0, n)  # unit-rate Poisson, scaled per rate
    return np.cumsum(gaps), np.array(cls.input_lens)[pick], np.array(cls.output_lens)[pick]


def evaluate(model: StepTimeModel, cfg: SchedulerConfig, cls: RequestClass, rate: float,
             slo: SLOTarget, num_requests: int = 200, seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """(TTFT, TPOT) at the SLO percentile when the replica gets `rate` requests/s of `cls`."""
    arr, ins, outs = _requests(cls, num_requests, seed)
    return simulate(model, cfg, arr / rate, ins, outs).percentile(slo.percentile)


def idle_latency(model: StepTimeModel, cfg: SchedulerConfig, cls: RequestClass,
                 percentile: float) -> tuple[float, float]:  # fmt: skip
    """(TTFT, TPOT) percentiles of the class's requests each alone on the replica."""
    ins = np.array(cls.input_lens, dtype=float)
    outs = np.array(cls.output_lens, dtype=float)
    chunks = np.ceil(ins / cfg.max_num_batched_tokens)
    ttft = chunks * model.step_time(ins / chunks, 0 * ins, ins, ins * ins / 2 / chunks)
    ttft = ttft + getattr(model, "request_overhead_s", 0.0)
    tpot = model.step_time(0 * ins, 1 + 0 * ins, ins + outs / 2)
    return float(np.percentile(ttft, percentile)), float(np.percentile(tpot, percentile))


def saturated_throughput(model: StepTimeModel, cfg: SchedulerConfig, cls: RequestClass) -> float:
    """Steady-state completions/s of a replica whose queue never empties (Little's law).

    With B sequences running, each step decodes B tokens and prefills the prompts of the
    requests that replace finished ones: B * E[in] / E[out] tokens per step on average. B is
    the largest batch that max_num_seqs, the token budget and the KV blocks allow. Then
    throughput = B / (E[out] * step_time). No rate above it is sustainable, however loose the
    SLO; the bisection searches below it."""
    e_in = float(np.mean(cls.input_lens))
    e_out = float(np.mean(cls.output_lens))
    ratio = e_in / e_out
    kv_per_seq = (e_in + e_out / 2) / cfg.block_size + 1  # blocks held on average
    b = min(
        cfg.max_num_seqs, cfg.max_num_batched_tokens / (1 + ratio), cfg.num_kv_blocks / kv_per_seq
    )
    if b <= 0:
        return 0.0
    t = model.step_time(b * ratio, b, b * (e_in + e_out / 2), b * ratio * e_in / 2)
    return float(b / (e_out * t))


def rate_bound(model: StepTimeModel, cfg: SchedulerConfig, cls: RequestClass,
               slo: SLOTarget) -> CapacityResult:  # fmt: skip
    """What `max_rate` answers at most, in closed form: 0 when the class misses the SLO even
    unloaded (latencies: the unloaded ones), else the saturated throughput (the search never
    probes above it)."""
    idle_ttft, idle_tpot = idle_latency(model, cfg, cls, slo.percentile)
    if idle_ttft > slo.ttft_s or idle_tpot > slo.tpot_s:  # misses the SLO even unloaded
        return CapacityResult(0.0, idle_ttft, idle_tpot)
    top = saturated_throughput(model, cfg, cls)
    if top <= 0:  # not even one sequence fits
        return CapacityResult(0.0, math.inf, math.inf)
    return CapacityResult(top, idle_ttft, idle_tpot)


def max_rate(model: StepTimeModel, cfg: SchedulerConfig, cls: RequestClass, slo: SLOTarget, *,
             num_requests: int = 200, seed: int = 0, rel_tol: float = 0.05) -> CapacityResult:  # fmt: skip
    """Bisection for the highest rate whose TTFT and TPOT percentiles meet the SLO."""
    key = _key(model, cfg, cls, slo, num_requests, seed, rel_tol)
    with _lock:
        if key in _memo:
            return _memo[key]
    res = _max_rate(model, cfg, cls, slo, num_requests, seed, rel_tol)
    with _lock:
        _memo[key] = res
        _dirty.add(key)
    return res


def perf_workers() -> int:
    """Processes for cold capacity searches: $SKYBROKER_PERF_WORKERS, else one per core."""
    return max(1, int(os.environ.get("SKYBROKER_PERF_WORKERS", os.cpu_count() or 1)))


Job = tuple[StepTimeModel, SchedulerConfig, RequestClass, SLOTarget]
# Below this a process pool's start-up (fresh interpreters importing numpy and skybroker)
# costs more than it saves: measured cold on chat-8b, 14 jobs took 3-5 s in one process and
# 9-16 s through a pool on a 2-vCPU VM. The planner searches few GPU kinds at a
# time (7 classes each), so it mostly stays in process.
MIN_PARALLEL_JOBS = 24


def _job(args: tuple) -> CapacityResult:
    return _max_rate(*args)


def max_rates(jobs: list[Job], *, num_requests: int = 200, seed: int = 0,
              rel_tol: float = 0.05, workers: int | None = None) -> list[CapacityResult]:  # fmt: skip
    """`max_rate` of many (model, config, class, SLO); the ones not cached yet (each distinct
    key once) run in a pool of `workers` processes when there are enough of them."""
    keys = [_key(*j, num_requests, seed, rel_tol) for j in jobs]
    with _lock:
        missing = {k: j for k, j in zip(keys, jobs, strict=True) if k not in _memo}
    workers = perf_workers() if workers is None else workers
    args = [(*j, num_requests, seed, rel_tol) for j in missing.values()]
    if workers > 1 and len(missing) >= MIN_PARALLEL_JOBS:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: no fork of a process that may run threads (the broker server)
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(min(workers, len(args)), mp_context=ctx) as ex:
            results = list(ex.map(_job, args))
    else:
        results = [_job(a) for a in args]
    with _lock:
        _memo.update(zip(missing, results, strict=True))
        _dirty.update(missing)
        return [_memo[k] for k in keys]


def _max_rate(model: StepTimeModel, cfg: SchedulerConfig, cls: RequestClass, slo: SLOTarget,
              n: int, seed: int, rel_tol: float) -> CapacityResult:  # fmt: skip
    """Search on log(rate) for the root of the SLO margin g = log(max(TTFT_p / limit, TPOT_p /
    limit)): bracket from the saturated throughput down, then Illinois regula falsi. It stops
    when the bracket is within `rel_tol` or the feasible end is within `LATENCY_TOL` of the SLO
    (a higher rate would gain nothing the SLO could tell apart). Probes that surely miss the SLO
    stop early (`StopRule`); their g is a lower bound, which only slows the interpolation."""
    arr, ins, outs = _requests(cls, n, seed)
    rule = StopRule(slo.ttft_s, slo.tpot_s, slo.percentile)

    def probe(rate: float) -> tuple[float, float, float]:
        r = simulate(model, cfg, arr / rate, ins, outs, stop=rule)
        if r.stopped:
            return math.log(max(r.excess, 1.0 + 1e-9)), math.inf, math.inf
        ttft, tpot = r.percentile(slo.percentile)
        return math.log(max(ttft / slo.ttft_s, tpot / slo.tpot_s, 1e-12)), ttft, tpot

    bound = rate_bound(model, cfg, cls, slo)
    if bound.rate <= 0:
        return bound
    top = bound.rate
    fracs: tuple[float, ...] = (1.0, 0.5, 0.15, 0.04, 0.001)
    if n > COARSE_REQUESTS:  # bracket around a cheap search on fewer requests first
        h = _max_rate(model, cfg, cls, slo, COARSE_REQUESTS, seed, 0.1).rate / top
        if h > 0:
            # from the top down still (a probe that misses stops early: cheap)
            fracs = tuple(sorted({1.0, min(1.0, 1.2 * h), 0.9 * h, 0.6 * h, 0.3 * h, 0.05 * h,
                                  0.001}, reverse=True))  # fmt: skip
    hi, g_hi, best = top, math.inf, None
    for frac in fracs:  # coarse bracket from above
        g, ttft, tpot = probe(frac * top)
        if g <= 0:
            best, g_lo = (frac * top, ttft, tpot), g
            break
        hi, g_hi = frac * top, g
    if best is None:  # even a nearly idle replica misses the SLO
        return CapacityResult(0.0, ttft, tpot)
    if g_hi == math.inf:  # sustained throughput itself meets the SLO
        return CapacityResult(*best)
    x_lo, x_hi, side = math.log(best[0]), math.log(hi), 0
    while x_hi - x_lo > math.log1p(rel_tol) and g_lo < -LATENCY_TOL:
        w = x_hi - x_lo
        x = x_hi - g_hi * w / (g_hi - g_lo)
        x = min(max(x, x_lo + 0.1 * w), x_hi - 0.1 * w)  # always shrink the bracket
        g, ttft, tpot = probe(math.exp(x))
        if g <= 0:
            x_lo, g_lo, best = x, g, (math.exp(x), ttft, tpot)
            g_hi = g_hi / 2 if side == -1 else g_hi  # Illinois: the stale end weighs less
            side = -1
        else:
            x_hi, g_hi = x, g
            g_lo = g_lo / 2 if side == 1 else g_lo
            side = 1
    return CapacityResult(*best)


def memoized(parts: list, compute: Callable[[], tuple[float, float, float]]) -> tuple[float, float, float]:  # fmt: skip
    """Three floats computed once per key (memory, then the disk cache with the capacities):
    for simulation results other than capacities, e.g. a placement's latencies. `parts`
    must hold everything that decides the result (objects are digested)."""
    ident = [CACHE_VERSION] + [p if isinstance(p, str | int | float) else _digest(p) for p in parts]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
    with _lock:
        if key in _memo:
            r = _memo[key]
            return (r.rate, r.ttft_s, r.tpot_s)
    out = compute()
    with _lock:
        _memo[key] = CapacityResult(*out)
        _dirty.add(key)
    return out


def prefetch_disk_cache() -> None:
    """Load the disk cache into memory (once per process)."""
    disk = _load_disk()
    with _lock:
        for k, v in disk.items():
            _memo.setdefault(k, CapacityResult(*v))


def flush_disk_cache() -> None:
    """Write the results computed since the last flush (none: no disk access)."""
    with _lock:
        entries = {k: _memo[k] for k in _dirty if k in _memo}
        _dirty.clear()
    _save_disk(entries)
