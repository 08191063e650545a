"""From a deployment spec to the cheapest placement that meets the SLO.

`make_plan(spec, catalog)`:
1. the model's architecture (spec numbers, a local HF dir / GGUF header, or the table);
2. the workload's request-size classes and each user region's demand per class;
3. the offerings the constraints allow (infra "local": only this machine, at $0);
4. per GPU kind, every deployment configuration that fits (TP size, and G // TP replicas on
   an instance of G GPUs), each with its KV capacity and, per class, the highest rate one
   replica sustains within the SLO with the plan's margin of headroom (`skybroker.plan_perf`;
   searched only where the optimum needs it);
5. the ILP (`skybroker.optimizer`) picks offerings, configurations and counts; each chosen
   placement is then simulated serving its own mix of classes at its own load, and where the
   linear capacity rule is off the capacities are corrected and the ILP re-solved until
   stable (`skybroker.plan_mix`);
6. two baselines on the same predictions (`skybroker.plan_baselines`);
7. an infeasible spec gets the reason in words (`InfeasibleError`, `skybroker.plan_explain`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from skybroker.catalog.schema import Catalog, Offering
from skybroker.optimizer import Problem, Solution
from skybroker.perf.capacity import flush_disk_cache, prefetch_disk_cache
from skybroker.perf.workload import RequestClass, request_classes, workload_samples
from skybroker.plan_baselines import compute_baselines
from skybroker.plan_explain import explain_infeasible, no_fit_reason, no_offering_reason
from skybroker.plan_mix import MixCheck
from skybroker.plan_perf import perf_per_config, required_len, resolve_arch, slo_target
from skybroker.plan_problem import (
    Meta,
    OfferingKey,
    Warm,
    allowed_offerings,
    build_problem,
    egress_cost,
    local_offering,
    local_replicas,
    with_warm,
)
from skybroker.plan_solve import Search, served
from skybroker.provision.ports import left_open, port_unreachable
from skybroker.spec import DeploymentSpec


class InfeasibleError(Exception):
    """No placement meets the spec; the message says why, in words."""


@dataclass(frozen=True)
class Placement:
    offering: Offering
    spot: bool
    replicas: int  # instances
    tensor_parallel: int  # GPUs per engine
    capacity_rps: float  # per instance, for the traffic mix it serves
    ttft_s: float  # predicted at the SLO percentile for its mix at its load
    tpot_s: float
    serves: dict[str, float]  # user region -> req/s
    perf_source: str  # "roofline" | "profile:<file>"
    data_parallel: int = 1  # engines per instance (GPUs / tensor_parallel)
    price_per_hour: float = 0.0  # per instance on its market
    margin: float = 0.0  # capacities sized for steps (1 + margin) x the prediction
    headroom: float | None = None  # slowdown (factor - 1) it absorbs at its load
    latency_ci: float | None = None  # 95% CI half-width of the latency nearer its limit
    mix_rule_error: float | None = None  # linear rule vs the simulated mix (> 0: overstated)
    config_note: str = ""  # why this TP x replicas per instance

    @property
    def key(self) -> OfferingKey:
        o = self.offering
        return (o.cloud, o.region, o.instance_type, self.spot)

    @property
    def cost_per_hour(self) -> float:
        return self.replicas * self.price_per_hour


@dataclass(frozen=True)
class SolverInfo:
    status: str
    solve_time_s: float
    gap: float | None
    build_time_s: float = 0.0
    perf_time_s: float = 0.0
    num_offerings: int = 0  # offering rows the constraints allow
    num_classes: int = 0  # offering classes after aggregating zones
    num_pruned: int = 0  # offering classes left after dominance pruning
    num_components: int = 1
    solver: str = ""
    # GPU kinds whose capacities were searched (or cached); the others' offerings were ruled
    # out on upper bounds of their capacity alone
    searched: list[str] = field(default_factory=list)
    # seconds in every solve of the plan: the capacity searches' LPs and each mix round's
    # MILP (solve_time_s and build_time_s are the last MILP's)
    total_solve_time_s: float = 0.0


@dataclass
class Plan:
    spec: DeploymentSpec
    placements: list[Placement]
    cost_per_hour: float  # instances + egress
    egress_per_hour: float
    solver: SolverInfo
    baselines: dict[str, float | None] = field(default_factory=dict)
    baseline_notes: dict[str, str] = field(default_factory=dict)
    model: str = ""
    request_classes: list[dict[str, Any]] = field(default_factory=list)
    perf_notes: list[str] = field(default_factory=list)  # measured profiles skipped, and why
    # offerings left out because SkyPilot cannot open ports there, and what stays open on
    # the clouds placed (skybroker.provision.ports)
    network_notes: list[str] = field(default_factory=list)
    mix_rounds: int = 0  # ILP re-solves after correcting capacities for the simulated mixes
    # every placement's simulated mix within MIX_TOL of its (corrected) linear capacity; False
    # when the re-solves ran out first (the placements' mix_rule_error says by how much)
    mix_confirmed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "infra": self.spec.infra,
            "model": self.model,
            "cost_per_hour": round(self.cost_per_hour, 4),
            "egress_per_hour": round(self.egress_per_hour, 4),
            "placements": [
                {
                    "cloud": p.offering.cloud,
                    "region": p.offering.region,
                    "instance_type": p.offering.instance_type,
                    "gpu": p.offering.gpu,
                    "gpu_count": p.offering.gpu_count,
                    "spot": p.spot,
                    "replicas": p.replicas,
                    "tensor_parallel": p.tensor_parallel,
                    "data_parallel": p.data_parallel,
                    "price_per_hour": p.price_per_hour,
                    "cost_per_hour": round(p.cost_per_hour, 4),
                    "capacity_rps": round(p.capacity_rps, 4),
                    "ttft_s": round(p.ttft_s, 4),
                    "tpot_s": round(p.tpot_s, 5),
                    "serves": {u: round(r, 4) for u, r in p.serves.items()},
                    "perf_source": p.perf_source,
                    "margin": p.margin,
                    "headroom": None if p.headroom is None else round(p.headroom, 3),
                    "latency_ci": None if p.latency_ci is None else round(p.latency_ci, 4),
                    "mix_rule_error": None
                    if p.mix_rule_error is None
                    else round(p.mix_rule_error, 4),
                    "config_note": p.config_note,
                }
                for p in self.placements
            ],
            "solver": {k: getattr(self.solver, k) for k in SolverInfo.__dataclass_fields__},
            "baselines": self.baselines,
            "baseline_notes": self.baseline_notes,
            "request_classes": self.request_classes,
            "perf_notes": self.perf_notes,
            "network_notes": self.network_notes,
            "mix_rounds": self.mix_rounds,
            "mix_confirmed": self.mix_confirmed,
        }


# --- the plan -------------------------------------------------------------------------------


def _rows(spec: DeploymentSpec, catalog: Catalog | None, blocklist: frozenset[OfferingKey],
          local_slots: int) -> tuple[Catalog, list]:  # fmt: skip
    if spec.infra == "local":
        rows = [(local_offering(local_slots), False, 0.0)]
        if ("local", "local", "localhost", False) in blocklist:
            rows = []
        return Catalog(sources=["this machine"]), rows
    if catalog is None:
        from skybroker.catalog import load_catalog

        catalog = load_catalog()
    return catalog, allowed_offerings(spec, catalog, blocklist)


def network_notes(spec: DeploymentSpec, catalog: Catalog, placements: list[Placement]) -> list[str]:
    """What the plan left out because SkyPilot cannot expose a port there (said where the
    constraints name that cloud or region), and what stays open on the clouds placed."""
    named = set(spec.constraints.clouds or []) | set(spec.constraints.regions or [])
    skipped = sorted({(o.cloud, o.region) for o in catalog.offerings
                      if (o.cloud in named or o.region in named)
                      and port_unreachable(o.cloud, o.region)})  # fmt: skip
    notes = [f"left out {cloud} {region}: {port_unreachable(cloud, region)}"
             for cloud, region in skipped]  # fmt: skip
    return notes + left_open(p.offering.cloud for p in placements)


def make_plan(spec: DeploymentSpec, catalog: Catalog | None = None,
              blocklist: frozenset[OfferingKey] = frozenset(), *,
              time_limit: float = 20.0, baselines: bool = True,
              warm: Warm | None = None) -> Plan:  # fmt: skip
    """The cheapest placement of `spec` that meets its SLO, or InfeasibleError. With `warm`
    (a re-plan of what runs), the cheapest counting what switching costs: its running
    replicas cost their price, each new one its launch too; the plan's $/h is its price."""
    t0 = time.perf_counter()
    arch = resolve_arch(spec.model, spec.infra)
    if spec.infra == "local":  # the engine runs fp32 on CPU
        arch = replace(arch, dtype="float32")
    ins, outs = workload_samples(spec.workload)
    classes = request_classes(ins, outs)
    need_len = required_len(spec, arch, classes)
    prefetch_disk_cache()
    slots = local_replicas(spec, arch) if spec.infra == "local" else 1
    catalog, rows = _rows(spec, catalog, blocklist, slots)
    if not rows:
        raise InfeasibleError(no_offering_reason(spec))
    perf = perf_per_config(arch, spec, catalog, classes, rows, need_len, exact=False)
    problem, meta = build_problem(spec, catalog, classes, rows, perf, local_max=slots)
    problem = with_warm(problem, warm)
    if not problem.offerings:  # no replica fits in memory
        raise InfeasibleError(no_fit_reason(arch, need_len, rows, spec))
    search = Search(spec, arch, classes, slo_target(spec), (problem, meta), perf, time_limit,
                    time.perf_counter() - t0)  # fmt: skip
    mixed = search.mix_corrected()
    if mixed is None:
        search.refine(set(perf))
        problem, meta = search.view({})
        raise InfeasibleError(explain_infeasible(spec, arch, problem, classes, meta, time_limit))
    problem, meta, sol = mixed.problem, mixed.meta, mixed.sol
    t_mix = time.perf_counter()
    checks = search.check_mixes(problem, sol, meta, full=True)
    flush_disk_cache()  # the mixes' capacities and latencies, for the next plan
    search.perf_s += time.perf_counter() - t_mix
    plan = Plan(spec, _placements(problem, sol, meta, classes, checks), sol.cost - sol.launch_cost,
                egress_cost(problem, sol), SolverInfo(sol.status, sol.solve_time_s, sol.gap),
                model=arch.describe(),
                request_classes=[{"name": c.name, "share": round(c.share, 4),
                                  "mean_input": round(c.mean_input, 1),
                                  "mean_output": round(c.mean_output, 1)} for c in classes],
                mix_rounds=mixed.rounds, mix_confirmed=mixed.confirmed)  # fmt: skip
    if baselines:
        plan.baselines, plan.baseline_notes = compute_baselines(search)
        flush_disk_cache()
    # the notes of the configurations placed (every configuration would repeat them per TP)
    plan.perf_notes = sorted({n for i in sol.counts for n in meta.perf[i].notes})
    plan.network_notes = network_notes(spec, catalog, plan.placements)
    searched = sorted({k[0] for k, rp in perf.items() if rp and rp.exact})
    plan.solver = SolverInfo(sol.status, sol.solve_time_s, sol.gap, sol.build_time_s,
                             search.perf_s, len(rows), len(problem.offerings), sol.num_offerings,
                             sol.num_components, sol.solver, searched,
                             search.solve_s)  # fmt: skip
    return plan


def _config_note(i: int, meta: Meta, mix: dict[int, float], chosen: float) -> str:
    """Which TP x replicas per instance, and what the other configurations give the mix."""
    from skybroker.plan_mix import linear_capacity

    o = meta.rows[i][0]
    rp, dp = meta.perf[i], meta.dp[i]
    here = f"TP{rp.tp} x{dp}"
    if o.gpu == "cpu":
        return "one engine on this machine"
    alts = []
    for key in meta.configs_of(o.gpu):
        alt = meta.all_perf[key]
        if alt is None or key == rp.config or alt.tp > o.gpu_count:
            continue
        cap = (o.gpu_count // alt.tp) * linear_capacity(alt, mix) if mix else 0.0
        what = "misses the SLO" if cap <= 0 else f"{cap:.2f} req/s"
        alts.append(f"TP{alt.tp} x{o.gpu_count // alt.tp} {what}"
                    + ("" if alt.exact or cap <= 0 else " at most"))  # fmt: skip
    if not alts:
        smaller = "" if rp.tp == 1 else f"; TP<{rp.tp} does not fit"
        return f"{here}: the only configuration on {o.gpu_count}x{o.gpu}{smaller}"
    return f"{here} ({chosen:.2f} req/s per instance on its mix; {', '.join(alts)})"


def _placements(p: Problem, s: Solution, meta: Meta, classes: list[RequestClass],
                checks: dict[int, MixCheck]) -> list[Placement]:  # fmt: skip
    out = []
    for i, n in sorted(s.counts.items(), key=lambda kv: -kv[1] * p.offerings[kv[0]].price):
        o, spot, price = meta.rows[i]
        rp = meta.perf[i]
        rates = served(s, i)
        mix = rates or {b: c.share for b, c in enumerate(classes)}
        tot = sum(mix.values())
        inv = sum(
            v / tot / p.offerings[i].mu[b] for b, v in mix.items() if p.offerings[i].mu[b] > 0
        )
        serves: dict[str, float] = {}
        loc = p.offerings[i].location
        share = {b: v / sum(vv for (j, bb), vv in s.rates.items()
                            if bb == b and p.offerings[j].location == loc)
                 for b, v in rates.items()}  # fmt: skip
        for (u, l_, b), v in s.flows.items():
            if l_ == loc and b in share:
                serves[u] = serves.get(u, 0.0) + v * share[b]
        c = checks.get(i)
        cap = 1 / inv if inv else 0.0
        if c is not None:
            ttft, tpot = c.ttft_s, c.tpot_s
        else:  # serves nothing (min_replicas): its classes' latencies at their capacity
            used = [rp.caps[b] for b in mix if rp.caps[b].rate > 0] or list(rp.caps)
            ttft, tpot = max(x.ttft_s for x in used), max(x.tpot_s for x in used)
        out.append(Placement(o, spot, n, rp.tp, cap, ttft, tpot, serves, rp.source, meta.dp[i],
                             price, rp.margin, c.headroom if c else None, c.ci if c else None,
                             c.rule_error if c else None,
                             _config_note(i, meta, mix, cap)))  # fmt: skip
    return out
