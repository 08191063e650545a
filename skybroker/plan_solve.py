"""The plan's solve loop: capacities searched where the optimum needs them, then corrected
for the mix of requests each chosen placement serves until the plan is stable.

`Search` holds a spec's problem with every capacity an upper bound at first (`skybroker.
plan_perf`), the searches done so far, and the per-offering mix factors:
- `optimize(scale, only)` solves the problem (optionally restricted to offerings `only`
  keeps), searching the capacities of the configurations its optimum uses until that optimum
  uses only searched ones (it is then the real optimum: bounds only relax the problem);
- `mix_corrected(only)` repeats: simulate each chosen placement serving its own mix at its
  own load (`skybroker.plan_mix.check`), set that offering's factor to simulated / linear
  where the two differ by more than MIX_TOL, re-solve; until no factor changes, a set of
  factors comes back, or MIX_ROUNDS re-solves. Factors go up (where a mix batches better
  than the rule says) only after the first solution, down after any: capacities raised for
  one mix invite the ILP to give that offering another, and raising them again each round
  oscillates instead of settling. The answer is the cheapest solution
  of those rounds whose every placement's load is within its simulated mix capacity
  (`confirmed`), else the last one.

The plan and both baselines go through the same loop, so they are compared on the same
(mix-corrected) predictions. Every step is deterministic: bounds before searches whatever the
cache holds, seeded simulations, one-thread seeded HiGHS with node (not time) limits on its
warm start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from skybroker.models import ModelArch
from skybroker.optimizer import Options, Problem, Solution, solve
from skybroker.perf.capacity import SLOTarget, flush_disk_cache
from skybroker.perf.workload import RequestClass
from skybroker.plan_mix import MIX_TOL, MixCheck, check
from skybroker.plan_perf import ConfigKey, ReplicaPerf, replica_perfs
from skybroker.plan_problem import Meta, with_perf
from skybroker.spec import DeploymentSpec

MIX_ROUNDS = 2  # re-solves with corrected capacities at most
BASELINE_MIX_ROUNDS = 1  # ... for each single-GPU-kind fleet a baseline tries
Only = Callable[[int], bool] | None  # which offering classes a (baseline's) problem keeps


@dataclass
class Mixed:
    """A mix-corrected solution and the problem it solves."""

    problem: Problem
    meta: Meta
    sol: Solution
    checks: dict[int, MixCheck]
    rounds: int  # re-solves after the first solution
    confirmed: bool  # every placement's load within its simulated mix capacity


@dataclass
class Search:
    spec: DeploymentSpec
    arch: ModelArch
    classes: list[RequestClass]
    slo: SLOTarget
    base: tuple[Problem, Meta]  # capacities as first built (bounds where not searched)
    perf: dict[ConfigKey, ReplicaPerf | None]
    time_limit: float = 20.0
    perf_s: float = 0.0  # seconds in capacity searches and mix simulations
    solve_s: float = 0.0  # seconds in every solve (LP and MILP, prune and build included)
    log: list[str] = field(default_factory=list)
    _full: tuple | None = None  # the last view before `only`: (key, (problem, meta))

    def refine(self, keys: set[ConfigKey]) -> None:
        """Search the capacities of these configurations (once each)."""
        todo = sorted(k for k in keys if (rp := self.perf.get(k)) is not None and not rp.exact)
        if not todo:
            return
        t = time.perf_counter()
        got = replica_perfs([(self.arch, self.perf[k].hw, self.perf[k].kv_tokens, None)  # type: ignore[union-attr]
                             for k in todo], self.spec, self.classes)  # fmt: skip
        self.perf.update(zip(todo, got, strict=True))
        flush_disk_cache()
        self.perf_s += time.perf_counter() - t

    def view(self, scale: dict[int, float], only: Only = None) -> tuple[Problem, Meta]:
        """The problem with today's capacities times `scale`; offerings `only` rejects serve
        nothing (zero capacity: the optimizer drops them; indices stay those of the plan)."""
        key = (tuple(sorted(scale.items())), sum(rp is not None and rp.exact
                                                  for rp in self.perf.values()))  # fmt: skip
        if self._full is None or self._full[0] != key:  # (a 10x catalog: 26,000 classes)
            self._full = (key, with_perf(*self.base, self.perf, scale))
        p, m = self._full[1]
        if only is not None:
            zero = (0.0,) * p.num_classes
            p = replace(p, offerings=[oc if only(i) else replace(oc, mu=zero)
                                      for i, oc in enumerate(p.offerings)])  # fmt: skip
        return p, m

    def bound(self, only: Only = None) -> float:
        """A lower bound of the cost: the LP relaxation on today's capacities (upper bounds
        where not searched), nothing searched."""
        s = solve(self.view({}, only)[0], options=Options(self.time_limit, relaxation=True))
        return s.cost if s.status != "infeasible" else math.inf

    def optimize(self, scale: dict[int, float], only: Only = None,
                 relax: bool = True) -> tuple[Problem, Meta, Solution]:  # fmt: skip
        """Solved on upper bounds the problem is a relaxation; once its optimum uses only
        searched offerings it is the real one. The LP relaxation (fast) picks what to search
        first (unless not `relax`: a re-solve whose searches are mostly done), the MILP has
        the last word."""
        while True:
            p, m = self.view(scale, only)
            t = time.perf_counter()
            sol = solve(p, options=Options(time_limit=self.time_limit, relaxation=relax))
            self.solve_s += time.perf_counter() - t
            todo = {m.perf[i].config for i in sol.counts if not m.perf[i].exact}
            if todo:
                self.refine(todo)
            elif relax and sol.status != "infeasible":
                relax = False
            else:
                return p, m, sol

    def mix_corrected(self, only: Only = None, max_rounds: int = MIX_ROUNDS) -> Mixed | None:
        """The loop of the module docstring; None when infeasible from the first solve."""
        scale: dict[int, float] = {}
        seen: set[tuple] = set()
        best: Mixed | None = None
        last: Mixed | None = None
        for rounds in range(max_rounds + 1):
            p, m, sol = self.optimize(scale, only, relax=rounds == 0)
            if sol.status == "infeasible":
                break
            t = time.perf_counter()
            checks = self.check_mixes(p, sol, m, full=False)
            self.perf_s += time.perf_counter() - t
            ok = all(c.rate <= c.simulated * (1 + MIX_TOL) for c in checks.values())
            last = Mixed(p, m, sol, checks, rounds, ok)
            if ok and (best is None or sol.cost < best.sol.cost - 1e-9):
                best = last
            elif rounds >= 1 and best is not None and sol.cost >= best.sol.cost - 1e-9:
                break  # from here factors only fall, so no later round is cheaper
            new = dict(scale)
            for i, c in checks.items():
                f = c.simulated / c.linear if c.linear > 0 else 1.0
                if f < scale.get(i, 1.0) * (1 - MIX_TOL) or (rounds == 0 and f > 1 + MIX_TOL):
                    new[i] = f
            key = tuple(sorted((i, round(f, 6)) for i, f in new.items()))
            if new == scale or key in seen:
                break
            seen.add(key)
            scale = new
        self.log.append(f"mix rounds {last.rounds if last else 0}")
        if best is not None:
            return replace(best, rounds=last.rounds if last else best.rounds)
        return last

    def check_mixes(self, p: Problem, s: Solution, meta: Meta,
                    full: bool) -> dict[int, MixCheck]:  # fmt: skip
        """Each used offering class simulated under the mix it serves (one replica's share);
        with `full`, its latencies and headroom at its load too."""
        out: dict[int, MixCheck] = {}
        seen: dict[tuple, MixCheck] = {}  # replicas of one configuration with the same load
        for i, count in sorted(s.counts.items()):
            rates = served(s, i)
            if not rates:
                continue
            engines = count * meta.dp[i]
            mix = {b: v / engines for b, v in rates.items()}
            key = (meta.perf[i].config, tuple(sorted((b, round(v, 6)) for b, v in mix.items())))
            if key not in seen:
                seen[key] = check(meta.perf[i], self.classes, mix, sum(mix.values()), self.slo,
                                  _n(), full)  # fmt: skip
            out[i] = seen[key]
        return out

    def mix_capacity(self, i: int, meta: Meta, demand: list[float]) -> float:
        """req/s of the demand mix one instance of offering class i sustains, simulated."""
        rp = meta.perf[i]
        mix = {b: d for b, d in enumerate(demand) if d > 0}
        if not mix:
            return 0.0
        t = time.perf_counter()
        c = check(rp, self.classes, mix, sum(mix.values()), self.slo, _n(), full=False)
        self.perf_s += time.perf_counter() - t
        return meta.dp[i] * c.simulated if math.isfinite(c.simulated) else 0.0


def _n() -> int:
    from skybroker.plan_perf import SIM_REQUESTS

    return SIM_REQUESTS


def served(s: Solution, i: int) -> dict[int, float]:
    """req/s per request class the solution gives offering class i (all its instances)."""
    return {b: v for (j, b), v in s.rates.items() if j == i and v > 1e-9}
