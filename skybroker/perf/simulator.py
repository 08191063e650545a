"""Discrete-event simulation of the engine's scheduler on one replica.

The policy is the engine's (vLLM v1 / nano-vllm style):
- continuous batching: every step takes up to `max_num_batched_tokens` tokens, running
  sequences first (in admission order), then waiting ones (FCFS), at most `max_num_seqs`
  running; a prompt longer than the remaining budget is prefilled in chunks;
- a sequence with `num_tokens` known tokens and `computed` of them in the KV cache schedules
  `num_tokens - computed` tokens (1 when decoding); when the cache catches up it emits a token;
- KV cache in blocks of `block_size` tokens, `num_kv_blocks` in all; when a running sequence
  needs a block and none is free, the most recently admitted running sequence is preempted by
  recompute (its blocks freed, it goes back to the head of the waiting queue);
- the step's time comes from a step-time model (roofline or measured profile).

A model with `request_overhead_s` (a measured profile's server overhead) delays each request's
entry into the engine by it and counts it in the TTFT. A model with `step_noise` (quantiles of
one step's time over its shape's median, as the profiler measured them) has each step's time
multiplied by a factor drawn from that distribution (inverse CDF, generator seeded by `seed`):
a busy CPU's steps vary, and the tail latencies show it. A `speed` trace (window start
times, factors) scales every step starting in a window by its factor: a machine whose speed
drifts, as measured while it served (benchmarks/validate_perf.py); the planner passes none.

Results per request: TTFT (first token time - arrival) and TPOT ((finish - first token) /
(output tokens - 1)), as vLLM's benchmarks define them.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class StepTimeModel(Protocol):
    source: str

    def step_time(self, num_prefill_tokens: float, num_decode_seqs: float,
                  total_context_tokens: float, prefill_attn_pairs: float = 0.0) -> float: ...  # fmt: skip


StepFn = Callable[[float, float, float, float], float]


def step_fn(model: StepTimeModel) -> StepFn:
    """The model's scalar step-time function; models may offer a faster one (`fast_step()`:
    constants bound once) than the numpy-friendly `step_time`."""
    fast = getattr(model, "fast_step", None)
    return fast() if fast is not None else model.step_time


NOISE_RING = 1 << 15  # step-noise factors drawn per simulation, reused cyclically


@functools.lru_cache(maxsize=16)
def _noise_prefix_sums(quantiles: tuple[float, ...], seed: int) -> list[float]:
    """Prefix sums of NOISE_RING factors drawn by inverse CDF from the quantiles (a capacity
    search simulates the same model many times: draw once)."""
    q = np.asarray(quantiles, dtype=float)
    u = np.random.default_rng(seed).random(NOISE_RING)
    factors = np.interp(u, np.linspace(0.0, 1.0, len(q)), q)
    return np.concatenate([[0.0], np.cumsum(factors)]).tolist()


class StepNoise:
    """Multiplicative step-time factors, drawn once per simulation: from measured quantiles
    (inverse CDF), or with `block`, read from a measured series in blocks of consecutive
    entries; `take(k)` is the sum of the next k factors (one prefix-sum lookup, so a run of k
    identical decode steps costs O(1))."""

    __slots__ = ("cum", "pos")

    def __init__(self, values: list[float] | tuple[float, ...], seed: int,
                 block: int = 0) -> None:  # fmt: skip
        v = tuple(values)
        self.cum = _block_prefix_sums(v, seed, block) if block else _noise_prefix_sums(v, seed)
        self.pos = 0

    def take(self, k: int) -> float:
        if self.pos + k > NOISE_RING:
            self.pos = 0
        j, self.pos = self.pos, self.pos + k
        return self.cum[j + k] - self.cum[j]


@functools.lru_cache(maxsize=16)
def _block_prefix_sums(series: tuple[float, ...], seed: int, block: int) -> list[float]:
    """Prefix sums of NOISE_RING factors read from `series` in blocks of `block` consecutive
    entries, each block starting at a seeded random place (wrapping around): a block
    bootstrap, which keeps the series' runs of slow steps together."""
    x = np.asarray(series, dtype=float)
    starts = np.random.default_rng(seed).integers(0, len(x), -(-NOISE_RING // block))
    idx = (starts[:, None] + np.arange(block)[None, :]).ravel()[:NOISE_RING] % len(x)
    return np.concatenate([[0.0], np.cumsum(x[idx])]).tolist()


SERVED_BLOCK = 64  # served steps read in a row (slow patches last 2-7 steps; 64 keeps drift too)


def _step_factors(model: StepTimeModel, seed: int) -> Callable[[int, bool, int], float]:
    """`factors(k, has_prefill, decode_seqs)`: the sum of the next k steps' time factors (k
    when the model has no noise). A profile's served steps give a median per kind of step
    times residuals read in blocks of consecutive served steps; else its grid's `step_noise`
    is drawn independently per step (one stream for decode steps, one for prefill steps)."""
    served = getattr(model, "served_factors", None)
    if served is not None:
        ring = StepNoise(served.residual, seed, block=SERVED_BLOCK)
        med: dict[tuple[bool, int], float] = {}

        def from_served(k: int, has_prefill: bool, d: int) -> float:
            m = med.get((has_prefill, d))
            if m is None:
                m = med[has_prefill, d] = served.median(has_prefill, d)
            return m * ring.take(k)

        return from_served
    q = getattr(model, "step_noise", None)
    if not q:
        return lambda k, has_prefill, d: float(k)
    noise, pnoise = StepNoise(q, seed), StepNoise(q, seed + 1)
    return lambda k, has_prefill, d: (pnoise if has_prefill else noise).take(k)


@dataclass(frozen=True, slots=True)
class StopRule:
    """Stop a simulation as soon as the SLO is surely missed: more than `n - 1 - floor(p/100 *
    (n - 1))` requests over a limit put the p-th percentile (numpy's linear interpolation)
    over it, whatever the other requests do."""

    ttft_s: float
    tpot_s: float
    percentile: float

    def max_violations(self, n: int) -> int:
        return n - 1 - math.floor(self.percentile / 100 * (n - 1))


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int = 100_000
    block_size: int = 16


@dataclass(slots=True)
class SimResult:
    ttft: np.ndarray  # seconds per request (inf if it never ran)
    tpot: np.ndarray
    finish: np.ndarray
    num_steps: int
    num_preemptions: int
    stopped: bool = False  # a StopRule ended it early: ttft/tpot are incomplete
    excess: float = 0.0  # when stopped: a lower bound of max(TTFT/limit, TPOT/limit) at p

    def percentile(self, p: float) -> tuple[float, float]:
        """(TTFT, TPOT) at percentile p (0-100)."""
        return float(np.percentile(self.ttft, p)), float(np.percentile(self.tpot, p))


def simulate(model: StepTimeModel, cfg: SchedulerConfig, arrivals: np.ndarray,
             input_lens: np.ndarray, output_lens: np.ndarray, *,
             max_steps: int = 5_000_000, stop: StopRule | None = None,
             seed: int = 0, speed: tuple[np.ndarray, np.ndarray] | None = None,
             cached_lens: np.ndarray | None = None) -> SimResult:  # fmt: skip
    """Run the requests (sorted by arrival) through the scheduler; times in seconds.

    State lives in numpy arrays indexed by request; `run` holds the running requests in
    admission order, so one step costs a few vector operations whatever the batch size.
    With `stop`, the run ends as soon as the SLO is surely missed (`SimResult.stopped`).
    `seed` seeds the step-time noise of a model that has some (same seed, same result).
    `cached_lens`: prompt tokens each request finds in the engine's prefix cache (whole
    blocks; they take KV blocks but no prefill work, again after a preemption); default none."""
    n = len(arrivals)
    st = step_fn(model)
    edges = np.append(np.asarray(speed[0], dtype=float)[1:], math.inf) if speed else None
    if speed is not None:
        st = _with_speed(st, *speed, clock=lambda: now)

    def next_edge(t: float) -> float:
        """When the speed window `t` is in ends (a decode run must not outlast its factor)."""
        return math.inf if edges is None else float(edges[np.searchsorted(edges, t, "right")])

    factors = _step_factors(model, seed)
    # a request reaches the engine `off` seconds after it was sent (server overhead)
    off = float(getattr(model, "request_overhead_s", 0.0))
    # ... and its first token reaches the client `busy_off` later when the engine was busy.
    # Never earlier: a request that arrives mid-step takes the same HTTP and pipe path, and
    # the wait for the step in progress is simulated; a busy probe below the idle one is noise.
    busy_off = max(float(getattr(model, "busy_request_overhead_s", off)) - off, 0.0)
    late_first = np.zeros(n)
    arrival = np.asarray(arrivals, dtype=float) + off
    prompt = np.asarray(input_lens, dtype=np.int64)
    out = np.maximum(np.asarray(output_lens, dtype=np.int64), 1)
    cached = np.zeros(n, np.int64) if cached_lens is None else np.asarray(cached_lens, np.int64)
    computed = cached.copy()
    generated = np.zeros(n, np.int64)
    blocks = np.zeros(n, np.int64)
    first = np.full(n, -1.0)
    ttft, tpot, finish = np.full(n, np.inf), np.full(n, np.inf), np.full(n, np.inf)
    waiting: deque[int] = deque()
    run = np.zeros(0, np.int64)
    bs, free = cfg.block_size, cfg.num_kv_blocks
    now, nxt, steps, preemptions, done = 0.0, 0, 0, 0, 0
    allowed = stop.max_violations(n) if stop is not None else n
    over_ttft: list[float] = []  # requests over a limit: their latency / limit
    over_tpot: list[float] = []

    def retire(idx: np.ndarray) -> None:
        nonlocal free, done
        ttft[idx] = first[idx] - arrival[idx] + off + late_first[idx]
        t = np.where(out[idx] > 1, (now - first[idx]) / np.maximum(out[idx] - 1, 1), 0.0)
        tpot[idx] = t
        finish[idx] = now
        free += int(blocks[idx].sum())
        blocks[idx] = 0
        done += len(idx)
        if stop is not None and t.max() > stop.tpot_s:
            over_tpot.extend((t[t > stop.tpot_s] / stop.tpot_s).tolist())

    def missed() -> bool:
        """The SLO is surely missed: too many requests already over a limit."""
        if len(over_tpot) > allowed or len(over_ttft) > allowed:
            return True
        assert stop is not None
        late = now + off - stop.ttft_s  # waiting since before this: TTFT over the limit
        extra = []
        for i in waiting:  # in arrival order but for preempted ones at the head
            if arrival[i] >= late:
                break
            if first[i] < 0:
                extra.append((now + off - arrival[i]) / stop.ttft_s)
        if len(over_ttft) + len(extra) <= allowed:
            return False
        over_ttft.extend(extra)
        return True

    while done < n and steps < max_steps:
        while nxt < n and arrival[nxt] <= now:
            if busy_off and (len(run) or waiting):
                late_first[nxt] = busy_off
            waiting.append(nxt)
            nxt += 1
        if not len(run) and not waiting:
            now = arrival[nxt]
            continue
        if stop is not None and waiting and missed():
            return _stopped(ttft, tpot, finish, steps, preemptions, over_ttft, over_tpot, allowed)
        need = prompt[run] + generated[run] - computed[run]
        if len(run) and (not waiting or len(run) >= cfg.max_num_seqs) and (need == 1).all():
            k, dt = _decode_run(st, run, computed, generated, out, blocks, free, bs, cfg,
                                arrival[nxt] - now if nxt < n else math.inf,
                                next_edge(now) - now)  # fmt: skip
            if k > 1:
                now += dt / k * factors(k, False, len(run))
                steps += k
                computed[run] += k
                generated[run] += k
                nb = -(-computed[run] // bs)
                free -= int((nb - blocks[run]).sum())
                blocks[run] = nb
                fin = generated[run] >= out[run]
                if fin.any():
                    retire(run[fin])
                    run = run[~fin]
                    if len(over_tpot) > allowed:
                        return _stopped(ttft, tpot, finish, steps, preemptions, over_ttft,
                                        over_tpot, allowed)  # fmt: skip
                continue
        # running requests first, in admission order, within the token budget
        budget = cfg.max_num_batched_tokens
        k = np.minimum(np.maximum(budget - (np.cumsum(need) - need), 0), need)
        newb = np.where(k > 0, -(-(computed[run] + k) // bs) - blocks[run], 0)
        preempted = False
        if newb.sum() > free:  # preempt the most recently admitted until the rest fits
            cum_new = np.cumsum(newb)
            held_after = np.concatenate([np.cumsum(blocks[run][::-1])[::-1][1:], [0]])
            fits = cum_new <= free + held_after
            j = int(np.flatnonzero(fits)[-1]) + 1 if fits.any() else 0
            victims = run[j:]
            free += int(blocks[victims].sum())
            blocks[victims] = 0
            computed[victims] = cached[victims]
            waiting.extendleft(victims[::-1].tolist())
            preemptions += len(victims)
            run, k, newb = run[:j], k[:j], newb[:j]
            preempted = True
        free -= int(newb.sum())
        blocks[run] += newb
        budget -= int(k.sum())
        adm: list[int] = []
        adm_k: list[int] = []
        while not preempted and waiting and budget > 0 and len(run) + len(adm) < cfg.max_num_seqs:
            i = waiting[0]
            ki = min(int(prompt[i] + generated[i] - computed[i]), budget)
            nb = -(-(int(computed[i]) + ki) // bs) - int(blocks[i])
            if nb > free:
                break
            waiting.popleft()
            free -= nb
            blocks[i] += nb
            budget -= ki
            adm.append(i)
            adm_k.append(ki)
        if adm:
            run = np.concatenate([run, np.array(adm, np.int64)])
            k = np.concatenate([k, np.array(adm_k, np.int64)])
        sel = k > 0
        s, ks = run[sel], k[sel]
        if not len(s):  # the head request cannot fit in the whole KV cache: drop it
            i = waiting.popleft()
            free += int(blocks[i])
            blocks[i] = 0
            done += 1
            continue
        c = computed[s]
        dec = (ks == 1) & (c > 0)
        pre = ~dec
        kp = ks[pre]
        dt = st(float(kp.sum()), float(dec.sum()), float((c + ks).sum()),
                float((kp * (c[pre] + kp / 2)).sum()))  # fmt: skip
        now += dt * factors(1, len(kp) > 0, int(dec.sum()))
        steps += 1
        computed[s] += ks
        emit = s[computed[s] == prompt[s] + generated[s]]
        generated[emit] += 1
        new_first = emit[first[emit] < 0]
        first[new_first] = now
        if stop is not None and len(new_first):
            w = now + off - arrival[new_first]
            if w.max() > stop.ttft_s:
                over_ttft.extend((w[w > stop.ttft_s] / stop.ttft_s).tolist())
        fin = generated[run] >= out[run]
        if fin.any():
            retire(run[fin])
            run = run[~fin]
        if len(over_ttft) > allowed or len(over_tpot) > allowed:
            return _stopped(ttft, tpot, finish, steps, preemptions, over_ttft, over_tpot, allowed)
    return SimResult(ttft, tpot, finish, steps, preemptions)


def _with_speed(st: StepFn, starts: np.ndarray, factors: np.ndarray,
                clock: Callable[[], float]) -> StepFn:  # fmt: skip
    """`st` scaled by the factor of the speed window that `clock()` (the step's start) is in."""
    starts, factors = np.asarray(starts, dtype=float), np.asarray(factors, dtype=float)

    def step(p: float, n: float, ctx: float, pairs: float = 0.0) -> float:
        i = max(int(np.searchsorted(starts, clock(), side="right")) - 1, 0)
        return st(p, n, ctx, pairs) * float(factors[i])

    return step


def _stopped(ttft: np.ndarray, tpot: np.ndarray, finish: np.ndarray, steps: int,
             preemptions: int, over_ttft: list[float], over_tpot: list[float],
             allowed: int) -> SimResult:  # fmt: skip
    # the percentile's order statistic is at least the (allowed + 1)-th largest value over
    excess = max(sorted(o)[-(allowed + 1)] for o in (over_ttft, over_tpot) if len(o) > allowed)
    return SimResult(ttft, tpot, finish, steps, preemptions, True, excess)


def _decode_run(st: StepFn, run: np.ndarray, computed: np.ndarray, generated: np.ndarray,
                out: np.ndarray, blocks: np.ndarray, free: int, bs: int, cfg: SchedulerConfig,
                until_arrival: float, until_speed: float = math.inf) -> tuple[int, float]:  # fmt: skip
    """(k, seconds) of the k identical decode steps that can run before anything changes: a
    sequence finishes, a new request arrives (and could be admitted), KV blocks run short, or
    the machine's speed changes (the last of the k steps starts before it does).
    Step times grow linearly with the context, so their sum is the trapezoid rule."""
    d = len(run)
    if d > cfg.max_num_batched_tokens:
        return 0, 0.0
    c = computed[run]
    ctx = int(c.sum())
    k = int((out[run] - generated[run]).min())
    slack = int((blocks[run] * bs - c).min())
    k = min(k, slack + bs * (free // d), 4096)
    t1 = st(0.0, d, ctx + d, 0.0)
    if until_arrival < math.inf and d < cfg.max_num_seqs:
        k = min(k, max(1, math.ceil(until_arrival / t1)))
    if until_speed < math.inf:
        k = min(k, max(1, math.ceil(until_speed / t1)))
    if k <= 1:
        return k, t1
    tk = st(0.0, d, ctx + k * d, 0.0)
    return k, k * (t1 + tk) / 2
