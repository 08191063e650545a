"""Each placement checked by simulating the mix of request classes it actually serves.

The ILP sizes a replica serving several classes by the linear rule: sum_b y_b / mu_b <= n,
each mu_b from a simulation of class b alone. A long prompt slows the decodes of the short
requests batched with it, which no solo simulation sees. `check` simulates one replica under
the placement's own mix and load:
- `simulated`: the highest rate of that mix one replica sustains within the SLO on the
  model slowed by the plan's margin (the same search as the solo capacities), against
  `linear`, what the rule gives for the mix; their ratio corrects the offering's capacities
  when the rule is off by more than `MIX_TOL` (`make_plan` re-solves until stable);
- `ttft_s`, `tpot_s`: the SLO percentiles at the placement's load on the unslowed model,
  averaged over independent replications until the 95% confidence interval's half-width
  relative to the estimate (`ci`) is within CI_GOAL;
- `headroom`: how much slower than predicted every step may run (a factor - 1) before the
  placement misses the SLO at its load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from skybroker.perf.capacity import SLOTarget, evaluate, max_rate, memoized
from skybroker.perf.headroom import Slowed, slowed
from skybroker.perf.workload import RequestClass
from skybroker.plan_perf import ReplicaPerf

MIX_TOL = 0.03  # the linear rule is kept where within 3% of the mix's simulation
MIX_SAMPLES = 512  # request lengths of a mix class
# A placement's latencies: replications of TAIL_REQUESTS requests (independent arrivals and
# lengths) until the 95% CI half-width of the percentile nearer its limit is within CI_GOAL,
# MIN_REPLICATIONS to MAX_REPLICATIONS of them. Measured on chat-8b's A40 TP2 placement near
# capacity, one run's p99 TPOT spread (sd) is 11.5% at 400 requests, 7.2% at 1600 and 2.5%
# at 6400: about 1/sqrt(n), so a placement near capacity needs 10-16 replications of 1,000.
TAIL_REQUESTS = int(os.environ.get("SKYBROKER_TAIL_REQUESTS", "1000"))
CI_GOAL = 0.05
MIN_REPLICATIONS, MAX_REPLICATIONS = 3, 16
MAX_HEADROOM = 3.0  # the headroom search stops at steps 4x the prediction
# Student's t, 97.5% quantile, by number of replications (n - 1 degrees of freedom)
_T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26,
        11: 2.23, 12: 2.20, 13: 2.18, 14: 2.16, 15: 2.14, 16: 2.13}  # fmt: skip


@dataclass(frozen=True)
class MixCheck:
    rate: float  # req/s one replica gets at the placement's load
    linear: float  # req/s of this mix one replica sustains, by the linear rule
    simulated: float  # ... by simulating the mix (on the slowed model)
    ttft_s: float  # at the SLO percentile at `rate`, unslowed, mean of the replications
    tpot_s: float
    ci: float  # 95% CI half-width of the worse of the two, relative to it
    headroom: float  # extra slowdown the replica absorbs at `rate` within the SLO

    @property
    def rule_error(self) -> float:
        """(linear - simulated) / simulated: > 0 where the rule overstates the capacity."""
        return self.linear / self.simulated - 1 if self.simulated > 0 else math.inf


def mix_class(classes: list[RequestClass], weights: dict[int, float]) -> RequestClass:
    """One class whose samples mix `classes` in proportion to `weights` (class -> req/s)."""
    tot = sum(weights.values())
    ins: list[int] = []
    outs: list[int] = []
    names = []
    for b, w in sorted(weights.items()):
        k = max(1, round(MIX_SAMPLES * w / tot))
        c = classes[b]
        idx = np.arange(k) % len(c.input_lens)
        ins += [c.input_lens[j] for j in idx]
        outs += [c.output_lens[j] for j in idx]
        names.append(f"{c.name}:{k}")
    # interleave so a prefix of the samples is a mix too (requests are drawn at random anyway)
    order = np.random.default_rng(0).permutation(len(ins))
    return RequestClass("mix(" + ";".join(names) + ")", 1.0, tuple(ins[j] for j in order),
                        tuple(outs[j] for j in order))  # fmt: skip


def linear_capacity(rp: ReplicaPerf, weights: dict[int, float]) -> float:
    tot = sum(weights.values())
    if any(w > 0 and rp.caps[b].rate <= 0 for b, w in weights.items()):
        return 0.0  # a class it cannot serve within the SLO
    inv = sum(w / tot / rp.caps[b].rate for b, w in weights.items() if w > 0)
    return 1 / inv if inv > 0 else 0.0


def _t95(n: int) -> float:
    return _T95.get(n, 2.0)


def latencies(model: object, rp: ReplicaPerf, cls: RequestClass, rate: float,
              slo: SLOTarget, n: int) -> tuple[float, float, float]:  # fmt: skip
    """(TTFT, TPOT) percentiles at `rate`, mean over seeded replications of `n` requests
    (until the CI goal, see CI_GOAL), and the relative 95% CI half-width of the one nearer
    its limit."""
    runs: list[tuple[float, float]] = []
    limits = np.array([slo.ttft_s, slo.tpot_s])
    while True:
        runs.append(evaluate(model, rp.cfg, cls, rate, slo, n, len(runs)))
        if len(runs) < MIN_REPLICATIONS:
            continue
        r = np.array(runs)
        mean = r.mean(0)
        worse = int(np.argmax(mean / limits))
        sd = r[:, worse].std(ddof=1)
        ci = _t95(len(runs)) * sd / math.sqrt(len(runs)) / mean[worse] if mean[worse] > 0 else 0.0
        if ci <= CI_GOAL or len(runs) >= MAX_REPLICATIONS:
            return float(mean[0]), float(mean[1]), float(ci)


def _meets(model: object, rp: ReplicaPerf, cls: RequestClass, rate: float, slo: SLOTarget,
           n: int) -> bool:  # fmt: skip
    ttft, tpot = evaluate(model, rp.cfg, cls, rate, slo, n, 0)
    return ttft <= slo.ttft_s and tpot <= slo.tpot_s


def headroom(rp: ReplicaPerf, cls: RequestClass, rate: float, slo: SLOTarget, n: int) -> float:
    """The largest f - 1 (to 2%) such that steps f x slower still meet the SLO at `rate`."""
    if not _meets(rp.step, rp, cls, rate, slo, n):
        return 0.0
    lo, hi = 1.0, 1.0 + MAX_HEADROOM
    if _meets(Slowed(rp.step, hi), rp, cls, rate, slo, n):
        return MAX_HEADROOM
    while hi / lo > 1.02:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _meets(Slowed(rp.step, mid), rp, cls, rate, slo, n) else (lo, mid)
    return lo - 1.0


def check(rp: ReplicaPerf, classes: list[RequestClass], weights: dict[int, float],
          rate: float, slo: SLOTarget, n: int, full: bool = True) -> MixCheck:  # fmt: skip
    """Simulate one replica of `rp` serving the mix `weights` (class -> req/s) at `rate`;
    without `full` only the capacities (latencies and headroom left NaN)."""
    cls = mix_class(classes, weights)
    lin = linear_capacity(rp, weights)
    if len(weights) == 1:  # one class: the solo capacity is the mix's
        sim = lin
    else:
        sim = max_rate(slowed(rp.step, rp.margin), rp.cfg, cls, slo, num_requests=n).rate
    if not full:
        return MixCheck(rate, lin, sim, math.nan, math.nan, math.nan, math.nan)
    tail = max(n, TAIL_REQUESTS)
    key = [rp.step, rp.cfg, cls, repr(rate), slo, tail, n, CI_GOAL, MAX_REPLICATIONS]
    ttft, tpot, ci = memoized(["latencies", *key],
                              lambda: latencies(rp.step, rp, cls, rate, slo, tail))  # fmt: skip
    room = memoized(["headroom", *key], lambda: (headroom(rp, cls, rate, slo, n), 0.0, 0.0))[0]
    return MixCheck(rate, lin, sim, ttft, tpot, ci, room)
