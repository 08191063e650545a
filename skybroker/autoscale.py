"""The autoscaler: observed load in, desired placements out, each decision with its reasons.

`Autoscaler.decide(load, targets, now)` compares the observed rate with what the running
targets serve within the SLO (their planned capacity, corrected for the observed token mix,
less `headroom`). When the SLO is at risk it scales up once that has lasted
`upscale_delay_s` (default: at once): to the capacity the rate needs when the rate exceeds
what is served; one replica at a time (none while replicas are still starting) when it is
measured on the replicas: their engines' queue holds a request per replica or more and has
not shrunk since the last look, their KV cache is `KV_FULL` on average, more requests are in
flight than they hold at the served rate, or the router's time to first byte at the SLO's
percentile exceeds the TTFT target. With `workload.schedule` it sizes for the scheduled rate
of the hours from now to one startup ahead (replicas are ready when the hour's rate arrives).
When a cheaper placement would serve the load it scales down only after that has held for
`downscale_delay_s`, and not while the replicas measure close to a limit.

What to run is chosen among two candidates for the capacity needed (rate / (1 - headroom)):
the running targets grown or shrunk replica by replica (best capacity per $ first), and a
fresh solve of the planner's ILP for the observed rate and mix (`Replan`, on `plan_step`'s
grid). Each is scored as its $/h over `SwitchCost.horizon_h` plus what switching to it costs
(every new replica is paid for `startup_s` before it serves, plus `per_launch` $), so a
re-plan replaces what runs only when the change pays for itself. Targets are the
controller's rows (`targets_from_plan`): `key`, `gpu`, `replicas`, `capacity_rps`,
`price_per_hour`. Nothing here starts processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from skybroker.autoscale_fit import Fit

Targets = list[dict[str, Any]]
# (capacity req/s needed, mean input tokens, mean output tokens, running targets) -> targets
# (the cheapest plan for that load counting what switching from the running ones costs), or
# raises
Replan = Callable[[float, float, float, Targets], Targets]
# Prefill of one token costs about this share of one decode step's per-request work; the
# capacity correction for a mix that differs from the planned one (the re-plan is exact).
PREFILL_WEIGHT = 0.1
# KV cache this full on the average engine: new requests wait for blocks, the SLO is at risk.
KV_FULL = 0.9


@dataclass
class Load:
    """What the router saw over the last window."""

    rate: float  # arrivals per second
    input_tokens: float = 0.0  # mean per request (0: unknown, the planned mix is assumed)
    output_tokens: float = 0.0
    in_flight: dict[str, int] = field(default_factory=dict)  # per replica
    window_s: float = 0.0
    ttft_s: float | None = None  # time to first byte at the SLO's percentile (None: no data)
    starting: int = 0  # replicas wanted that are not ready yet
    # per ready replica, its engine's gauges: num_requests_waiting, kv_cache_usage_perc, ...
    engines: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def waiting(self) -> int:
        return int(sum(e.get("num_requests_waiting", 0) for e in self.engines.values()))

    @property
    def kv_usage(self) -> float:
        """The mean KV-cache use of the ready replicas' engines (0 where none reports it)."""
        kv = [e["kv_cache_usage_perc"] for e in self.engines.values() if "kv_cache_usage_perc" in e]
        return sum(kv) / len(kv) if kv else 0.0


@dataclass
class Policy:
    """The spec's `autoscale:` block plus the SLO and planned mix it is judged against."""

    min_replicas: int = 1
    max_replicas: int = 10
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 300.0
    headroom: float = 0.2
    planned_input: float = 512.0
    planned_output: float = 256.0
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    percentile: float = 99.0
    schedule: dict[int, float] = field(default_factory=dict)  # req/s per hour of day (UTC)

    @classmethod
    def from_spec(cls, spec: Any) -> Policy:
        from skybroker.perf.workload import workload_samples

        a = spec.autoscale
        ins, outs = workload_samples(spec.workload)
        kw = {} if a is None else a.model_dump(exclude={"window_s"})
        return cls(
            **kw,
            planned_input=float(sum(ins) / len(ins)),
            planned_output=float(sum(outs) / len(outs)),
            ttft_s=spec.slo.ttft_ms / 1000,
            tpot_s=spec.slo.tpot_ms / 1000,
            percentile=spec.slo.percentile,
            schedule=dict(spec.workload.schedule or {}),
        )


@dataclass
class SwitchCost:
    """What a change of placement costs, against what it saves over `horizon_h`."""

    startup_s: float = 300.0  # a new replica is paid this long before it serves
    per_launch: float = 0.05  # $ per launch (image pull, warm-up risk)
    horizon_h: float = 1.0  # how long a decision is expected to hold
    # where the plan from scratch beats the step, also solve the plan warm-started from what
    # runs (off by default: one day of benchmarks/autoscale.py measured it, with `Fit`, dearer)
    warm: bool = False


@dataclass
class Decision:
    targets: Targets  # desired targets (the current ones where nothing changes)
    reasons: list[str]
    changed: bool = False
    kind: str = "hold"  # "up" | "down" | "replan" | "hold"


def plan_step(need: float) -> float:
    """`need` req/s rounded up to the grid re-plans are solved (and cached) on: quarter steps
    to 4 req/s, then about 9% steps (8 an octave), so a day's load needs a few dozen solves."""
    if need <= 4:
        return math.ceil(need * 4 - 1e-9) / 4
    return round(2 ** (math.ceil(math.log2(need) * 8 - 1e-9) / 8), 3)


def capacity(targets: Targets) -> float:
    return sum(t["replicas"] * t["capacity_rps"] for t in targets)


def hourly(targets: Targets) -> float:
    return sum(t["replicas"] * t["price_per_hour"] for t in targets)


def total_replicas(targets: Targets) -> int:
    return sum(int(t["replicas"]) for t in targets)


def where(t: dict[str, Any]) -> str:
    cloud, region, itype, spot = t["key"]
    gpu = t.get("gpu") or itype
    return f"{gpu} {cloud}/{region}{' spot' if spot else ''}"


def changes(old: Targets, new: Targets) -> list[str]:
    """`+1 A10G aws/us-east-1` per offering whose replica count differs."""
    have = {tuple(t["key"]): t for t in old}
    want = {tuple(t["key"]): t for t in new}
    out = []
    for key in list(want) + [k for k in have if k not in want]:
        n_old = have[key]["replicas"] if key in have else 0
        n_new = want[key]["replicas"] if key in want else 0
        if n_new != n_old:
            out.append(f"{n_new - n_old:+d} {where(want.get(key) or have[key])}")
    return out


class Autoscaler:
    """The scaling policy of one deployment (its state: since when it is over or under, and
    the engines' queue at the last look)."""

    def __init__(
        self,
        policy: Policy,
        replan: Replan | None = None,
        switch: SwitchCost | None = None,
        fit: Fit | None = None,
    ) -> None:
        self.policy = policy
        self.replan = replan
        self.switch = switch or SwitchCost()
        self.fit = fit  # the spec's users, reach and shares (None: capacities just add up)
        self.over_since: float | None = None
        self.under_since: float | None = None
        self.waiting: int | None = None  # the engines' queue at the last look
        # a replacement under way: when the new replicas serve, the targets to end at, and
        # what they replace
        self.handoff: tuple[float, Targets, str] | None = None
        self.blocked: frozenset = frozenset()  # at the last look
        self.reconsider = False  # the blocklist changed: a re-plan may pay without a change of load

    def mix_factor(self, load: Load) -> float:
        """Planned capacity x this = capacity for the observed mix (first order)."""
        p = self.policy
        if load.input_tokens <= 0 or load.output_tokens <= 0:
            return 1.0
        planned = PREFILL_WEIGHT * p.planned_input + p.planned_output
        return planned / (PREFILL_WEIGHT * load.input_tokens + load.output_tokens)

    def decide(
        self, load: Load, targets: Targets, now: float, blocked: frozenset = frozenset()
    ) -> Decision:
        """What to run for `load` at `now` (UTC seconds). Offerings in `blocked` (no
        capacity: a spot market gone scarce) are not grown, and what runs on them is
        replaced. A change that replaces replicas starts the new ones first and drains the
        replaced ones a startup later, when the new ones serve (`handoff`)."""
        if self.handoff is not None:
            d = self._hand_over(load, targets, now)
            if d is not None:
                return d
        if blocked != self.blocked:  # a market gone or back: weigh a re-plan until one wins
            self.blocked, self.reconsider = blocked, True
        if any(tuple(t["key"]) in blocked for t in targets):
            return self._move_off(load, targets, now, blocked)
        p = self.policy
        factor = self.mix_factor(load)
        served = self.capacity(targets) * factor * (1 - p.headroom)
        ahead = self.scheduled(now)
        need = self.need(load, now)
        n = total_replicas(targets)
        risk, measured = self._risk(load, targets, factor, served)
        if not risk and ahead and ahead[0] > served + 1e-9:
            rate, hour = ahead
            risk = f"schedule {rate:.2f} req/s at {hour:02d}:00 > {served:.2f} served within SLO"
        self.waiting = load.waiting if load.engines else None
        if n < p.min_replicas:
            risk, measured = f"{n} replicas < min_replicas {p.min_replicas}", False
        if risk:
            self.under_since = None
            self.over_since = now if self.over_since is None else self.over_since
            if now - self.over_since < p.upscale_delay_s:
                return Decision(targets, [f"{risk}; up in {self._left(now, True):.0f}s"])
            if load.starting and measured:
                return Decision(targets, [f"{risk}; waiting for {load.starting} starting"])
            if measured:  # seen on the replicas, not from the rate: one step more than runs
                need = max(need, self.capacity(targets) * factor * (1 + 1e-6))
            best, how = self._choose(load, targets, need / factor, factor)
            if hourly(best) <= hourly(targets) and self.capacity(best) <= self.capacity(targets):
                return Decision(targets, [f"{risk}; at max_replicas {p.max_replicas}"])
            self.over_since = None
            return self._decision(risk, targets, best, "up", how, now)
        self.over_since = None
        if self._near_slo(load):
            self.under_since = None  # measured near the SLO: fewer replicas would breach it
            return Decision(targets, [])
        best, how = self._choose(load, targets, need / factor, factor)
        if _cost(best) >= _cost(targets) or total_replicas(best) < p.min_replicas:
            self.under_since = None
            self.reconsider = False
            return Decision(targets, [])
        self.under_since = now if self.under_since is None else self.under_since
        down = self.capacity(best) * factor * (1 - p.headroom)
        why = f"rate {load.rate:.2f} req/s is served by {down:.2f}"
        if now - self.under_since < p.downscale_delay_s:
            return Decision(targets, [f"{why}; down in {self._left(now, False):.0f}s"])
        self.under_since = None
        return self._decision(f"{why} within SLO", targets, best, "down", how, now)

    def _move_off(self, load: Load, targets: Targets, now: float, blocked: frozenset) -> Decision:
        factor = self.mix_factor(load)
        gone = [t for t in targets if tuple(t["key"]) in blocked]
        live = [t for t in targets if tuple(t["key"]) not in blocked]
        need = self.need(load, now)
        best, how = self._choose(load, live, need / factor, factor)
        why = f"{', '.join(where(t) for t in gone)} has no capacity"
        if not best:
            return Decision(targets, [f"{why}; nothing else to run"])
        self.over_since = self.under_since = None
        return self._decision(why, targets, best, "replan", how or "moved", now)

    def _hand_over(self, load: Load, targets: Targets, now: float) -> Decision | None:
        """While a replacement is under way: hold, then drain what it replaced (None: the
        load outgrew the targets it ends at; decide afresh on what runs)."""
        assert self.handoff is not None
        at, final, what = self.handoff
        served = self.capacity(final) * self.mix_factor(load) * (1 - self.policy.headroom)
        if load.rate > served + 1e-9:
            self.handoff = None
            return None
        if now < at:
            return Decision(targets, [f"replacements for {what} starting"])
        self.handoff = None
        return self._decision(f"replacements for {what} ready", targets, final, "down", "")

    def need(self, load: Load, now: float) -> float:
        """The capacity (req/s of the observed mix) that keeps the headroom free for the rate
        seen, or for the one the schedule says arrives before a replica started now serves."""
        ahead = self.scheduled(now)
        return max(load.rate, ahead[0] if ahead else 0.0) / (1 - self.policy.headroom)

    def scheduled(self, now: float) -> tuple[float, int] | None:
        """The highest rate `workload.schedule` names for the hours from `now` (UTC
        seconds) to a startup later, and its hour (None: no schedule for them)."""
        sched = self.policy.schedule
        hours = {int(t // 3600) % 24 for t in (now, now + self.switch.startup_s)}
        rates = [(sched[h], h) for h in sorted(hours) if h in sched]
        return max(rates) if rates else None

    def _left(self, now: float, up: bool) -> float:
        since = self.over_since if up else self.under_since
        delay = self.policy.upscale_delay_s if up else self.policy.downscale_delay_s
        return max(0.0, delay - (now - (now if since is None else since)))

    def _risk(self, load: Load, targets: Targets, factor: float, served: float) -> tuple[str, bool]:
        """Why the SLO is at risk ("" if it is not), and whether that was measured on the
        replicas (queues, KV, TTFT: add one step at a time) rather than read from the rate."""
        if load.rate > served + 1e-9:
            return f"rate {load.rate:.2f} req/s > {served:.2f} served within SLO", False
        p = self.policy
        engines = len(load.engines)
        if engines and load.kv_usage >= KV_FULL:
            return f"KV cache {100 * load.kv_usage:.0f}% full (>= {100 * KV_FULL:.0f}%)", True
        # a queue of one request per replica or more that has not shrunk since the last look
        if engines and load.waiting >= engines and load.waiting >= (self.waiting or 0) > 0:
            return f"{load.waiting} requests queued on {engines} replicas, not shrinking", True
        # Little's law: at the rate served within SLO, the replicas hold this many in flight.
        out = load.output_tokens or p.planned_output
        holds = served * (p.ttft_s + out * p.tpot_s)
        busy = sum(load.in_flight.values())
        if busy > max(holds, 1.0) * 1.5:
            return f"{busy} requests in flight > {holds:.1f} the replicas hold within SLO", True
        if load.ttft_s is not None and load.ttft_s > p.ttft_s:
            q = f"p{p.percentile:g}"
            why = f"TTFT {q} {load.ttft_s:.2f}s > {p.ttft_s:.2f}s SLO at {load.rate:.2f} req/s"
            return why, True
        return "", False

    def _near_slo(self, load: Load) -> bool:
        """Measured close to a limit: fewer replicas would put the SLO at risk."""
        p = self.policy
        if load.ttft_s is not None and load.ttft_s > p.ttft_s * (1 - p.headroom):
            return True
        return load.waiting > 0 or load.kv_usage >= KV_FULL * (1 - p.headroom)

    def _decision(
        self, why: str, old: Targets, new: Targets, kind: str, how: str, now: float | None = None
    ) -> Decision:
        """`old` -> `new`; where `new` both adds replicas and removes some (a replacement,
        `now` given), the removed ones stay until the added ones serve."""
        moves = changes(old, new)
        self.reconsider = self.reconsider and not moves
        note = how if how and how != "moved" else ""
        reason = f"{why}: {', '.join(moves)}" + (f" ({note})" if note else "")
        kind = kind if how == "" else "replan"
        gone = [m for m in moves if m.startswith("-")]
        if now is None or not gone or len(gone) == len(moves):
            return Decision(new, [reason], changed=bool(moves), kind=kind)
        have = {tuple(t["key"]): t for t in old}
        both = [dict(t, replicas=max(t["replicas"], have.pop(tuple(t["key"]), t)["replicas"]))
                for t in new] + list(have.values())  # fmt: skip
        what = ", ".join(m[1:] for m in gone)
        self.handoff = (now + self.switch.startup_s, new, what)
        return Decision(both, [f"{reason}; {what} drain once the new serve"], True, kind)

    # -- candidates ---------------------------------------------------------------------------

    def _choose(
        self, load: Load, targets: Targets, need: float, factor: float, force: bool = True
    ) -> tuple[Targets, str]:
        """The cheapest candidate (with switching) whose planned capacity is >= `need`, and
        a note when it is the re-plan. Re-plans are solved when `force`, or when `need` left
        the band `targets` serve (more than they serve, or served with a replica fewer):
        the plan from scratch, and where
        it beats the step, the one warm-started from `targets` (their replicas already paid,
        new ones paid their startup), which keeps what runs unless a change pays."""
        step = self._step(targets, need)
        cands = [(step, "")]
        if self.replan is not None and (
            force or changes(targets, step) or self._spare(targets, need)
        ):
            # the plan from scratch for this load (shared by every running placement) first:
            # only where it would pay, the warm-started solve that keeps what runs
            for running in ([], targets) if self.switch.warm else ([],):
                fresh = self._replan(need, factor, load, running, targets)
                if fresh is None:
                    break
                cands.append((fresh, "re-planned"))
                if running or self._pick(targets, cands, need)[0] is step:
                    break
        best, how = self._pick(targets, cands, need)
        return (best, how) if changes(targets, best) else (targets, "")

    def _replan(
        self, need: float, factor: float, load: Load, running: Targets, targets: Targets
    ) -> Targets | None:
        """The re-plan for `need` (warm-started from `running`), its capacities as what runs
        keeps them (`keep_capacity`)."""
        assert self.replan is not None
        try:
            fresh = self.replan(need * factor, load.input_tokens, load.output_tokens, running)
        except Exception:  # infeasible for this rate/mix: keep stepping what runs
            return None
        return self._clamp(keep_capacity(targets, _rescale(fresh, factor)))

    def _pick(
        self, targets: Targets, cands: list[tuple[Targets, str]], need: float
    ) -> tuple[Targets, str]:
        """The cheapest of `cands` (with switching) that serves `need` (the first on a tie)."""
        scored = [(self._score(targets, c), i, c, how) for i, (c, how) in enumerate(cands)]
        ok = [s for s in scored if self.shortfall(s[2], need) <= 1e-9] or scored
        _, _, best, how = min(ok, key=lambda s: (s[0], s[1]))
        return best, how

    def _score(self, old: Targets, new: Targets) -> float:
        s = self.switch
        have = {tuple(t["key"]): t["replicas"] for t in old}
        launches = [(t, t["replicas"] - have.get(tuple(t["key"]), 0)) for t in new]
        switch = sum(
            k * (t["price_per_hour"] * s.startup_s / 3600 + s.per_launch)
            for t, k in launches
            if k > 0
        )
        return hourly(new) * s.horizon_h + switch + 1e-6 * total_replicas(new)

    def _step(self, targets: Targets, need: float) -> Targets:
        """The running targets with replicas added until they serve `need` (each time the
        replica that serves the most of what is missing per $, so a step keeps the users'
        RTT and the spot, region and cloud shares), or removed (worst capacity per $ first,
        each target keeping one) while the rest still serve it."""
        new = [dict(t) for t in targets]
        p = self.policy
        short = self.shortfall(new, need)
        while short > 1e-9 and total_replicas(new) < p.max_replicas and new:
            gains = []
            for i, t in enumerate(new):
                t["replicas"] += 1
                left = self.shortfall(new, need)
                t["replicas"] -= 1
                if left < short - 1e-9:
                    per_dollar = (short - left) / max(t["price_per_hour"], 1e-6)
                    gains.append((per_dollar, _value(t), -i, left))
            if not gains:  # no replica of what runs helps (a share or reach binds): re-plan
                break
            _, _, neg, short = max(gains)
            new[-neg]["replicas"] += 1
        while total_replicas(new) > p.min_replicas:
            spare = []
            for t in new:
                if t["replicas"] > 1:
                    t["replicas"] -= 1
                    if self.shortfall(new, need) <= 1e-9:
                        spare.append(t)
                    t["replicas"] += 1
            if not spare:
                break
            min(spare, key=_value)["replicas"] -= 1
        return new

    def _spare(self, targets: Targets, need: float) -> bool:
        """Whether one replica fewer (a target's last one too) would still serve `need`."""
        for t in targets:
            t["replicas"] -= 1
            ok = self.shortfall(targets, need) <= 1e-9
            t["replicas"] += 1
            if ok:
                return True
        return False

    def capacity(self, targets: Targets) -> float:
        """The highest rate `targets` serve within their planned capacities (and the spec's
        RTT and shares, with a `Fit`)."""
        return self.fit.servable(targets) if self.fit else capacity(targets)

    def shortfall(self, targets: Targets, need: float) -> float:
        if self.fit is None:
            return max(0.0, need - capacity(targets))
        return self.fit.shortfall(targets, need)

    def _clamp(self, targets: Targets) -> Targets:
        """At most max_replicas (the cheapest capacity kept), at least min_replicas."""
        new = [dict(t) for t in targets]
        p = self.policy
        while total_replicas(new) > p.max_replicas:
            worst = min((t for t in new if t["replicas"] > 0), key=_value)
            worst["replicas"] -= 1
        while total_replicas(new) < p.min_replicas and new:
            max(new, key=lambda t: t["capacity_rps"])["replicas"] += 1
        return [t for t in new if t["replicas"] > 0]


def _value(t: dict[str, Any]) -> float:
    return t["capacity_rps"] / max(t["price_per_hour"], 1e-6)


def _cost(targets: Targets) -> tuple[float, int]:
    """$/h, then replicas (at $0, as on this machine, fewer replicas are still cheaper)."""
    return round(hourly(targets), 9), total_replicas(targets)


def _rescale(targets: Targets, factor: float) -> Targets:
    """A re-plan's capacities are for the observed mix; as planned-mix figures (which the
    rest of the policy multiplies by `factor`), they are divided by it."""
    return [dict(t, capacity_rps=t["capacity_rps"] / factor) for t in targets]


def keep_capacity(old: Targets, new: Targets) -> Targets:
    """`new`, where an offering runs in `old`, at the lower of its two planned capacities.

    A target's capacity is what one replica serves of the request mix its plan sends it; a
    re-plan may send an offering a lighter mix and so plan it for more req/s, but the
    replicas running there were planned (and are judged) for the old one. Counting the
    higher figure for them would overstate what runs, and the headroom with it."""
    have = {tuple(t["key"]): t for t in old if t["replicas"] > 0}
    out = []
    for t in new:
        was = have.get(tuple(t["key"]))
        cap = min(t["capacity_rps"], was["capacity_rps"]) if was else t["capacity_rps"]
        out.append(dict(t, capacity_rps=cap))
    return out


def merge_targets(old: Targets, new: Targets) -> Targets:
    """`new` laid over `old`: offerings in both keep their index (their replicas keep their
    target), offerings `new` lacks stay with 0 replicas (drained), new ones are appended;
    running offerings keep the lower of their capacities (`keep_capacity`)."""
    want = {tuple(t["key"]): t for t in keep_capacity(old, new)}
    out = [dict(want.pop(tuple(t["key"]), {**t, "replicas": 0})) for t in old]
    return out + [dict(t) for t in want.values()]
