"""From a deployment spec to the cheapest placement that meets the SLO.

`make_plan(spec, catalog)`:
1. the model's architecture (spec numbers, a local HF dir / GGUF header, or the table);
2. the workload's request-size classes and each user region's demand per class;
3. the offerings the constraints allow (infra "local": only this machine, at $0);
4. per GPU kind, the tensor-parallel size that fits the model (auto: the smallest), the
   replica's KV capacity, and per class the highest rate one replica sustains within the SLO
   (roofline or measured profile -> scheduler simulation -> bisection; cached); an instance
   with more GPUs than one replica needs runs several replicas side by side (data parallel);
5. the ILP (`skybroker.optimizer`), then two baselines on the same predictions: the cheapest
   single GPU kind, and SkyPilot's way (the cheapest instance that fits, replicated);
6. an infeasible spec gets the reason in words (`InfeasibleError`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from skybroker.catalog.schema import Catalog, Offering
from skybroker.models import ModelArch, from_gguf, from_hf_dir, lookup
from skybroker.optimizer import OfferingClass, Options, Problem, Solution, solve
from skybroker.perf.capacity import (
    CapacityResult,
    SLOTarget,
    cached_rates,
    flush_disk_cache,
    max_rates,
    prefetch_disk_cache,
    rate_bound,
)
from skybroker.perf.profile import find_profile
from skybroker.perf.roofline import (
    Hardware,
    RooflineModel,
    cpu_hardware,
    cpu_roofline,
    kv_capacity_tokens,
)
from skybroker.perf.simulator import SchedulerConfig
from skybroker.perf.workload import RequestClass, request_classes, workload_samples
from skybroker.spec import DeploymentSpec, ModelSpec, SpecError

OfferingKey = tuple[str, str, str, bool]  # (cloud, region, instance_type, spot)

# Where users of a named area are (a big city of the area), for RTT estimates.
USER_AREAS: dict[str, tuple[float, float]] = {
    "us-east": (39.0, -77.5), "us-central": (41.3, -95.9), "us-west": (45.6, -121.2),
    "us-south": (32.8, -96.8), "canada": (45.5, -73.6), "eu-west": (53.3, -6.3),
    "eu-central": (50.1, 8.7), "eu-north": (59.3, 18.1), "eu-south": (45.5, 9.2),
    "uk": (51.5, -0.1), "asia-east": (25.0, 121.5), "asia-northeast": (35.7, 139.7),
    "asia-southeast": (1.35, 103.8), "asia-south": (19.1, 72.9), "oceania": (-33.9, 151.2),
    "sa-east": (-23.5, -46.6), "me": (25.2, 55.3), "africa": (-26.2, 28.0),
}  # fmt: skip
SIM_REQUESTS = int(os.environ.get("SKYBROKER_SIM_REQUESTS", "80"))


class InfeasibleError(Exception):
    """No placement meets the spec; the message says why, in words."""


@dataclass(frozen=True)
class Placement:
    offering: Offering
    spot: bool
    replicas: int  # instances
    tensor_parallel: int  # GPUs per engine
    capacity_rps: float  # per instance, for the traffic mix it serves
    ttft_s: float  # predicted at the SLO percentile (worst class served, at full load)
    tpot_s: float
    serves: dict[str, float]  # user region -> req/s
    perf_source: str  # "roofline" | "profile:<file>"
    data_parallel: int = 1  # engines per instance (GPUs / tensor_parallel)
    price_per_hour: float = 0.0  # per instance on its market

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
                }
                for p in self.placements
            ],
            "solver": {k: getattr(self.solver, k) for k in SolverInfo.__dataclass_fields__},
            "baselines": self.baselines,
            "baseline_notes": self.baseline_notes,
            "request_classes": self.request_classes,
            "perf_notes": self.perf_notes,
        }


# --- model, hardware, capacity --------------------------------------------------------------


def resolve_arch(m: ModelSpec, infra: str = "skypilot") -> ModelArch:
    """The architecture from the spec's numbers, a local path, or the well-known table."""
    arch: ModelArch | None = None
    if m.architecture is not None:
        a = m.architecture
        arch = ModelArch(m.label, a.num_layers, a.hidden_size, a.num_heads,
                         a.num_kv_heads or a.num_heads, a.head_dim or a.hidden_size // a.num_heads,
                         a.intermediate_size, a.vocab_size, a.tie_word_embeddings,
                         a.max_position_embeddings)  # fmt: skip
    elif m.path:
        p = Path(m.path).expanduser()
        if p.is_dir():
            arch = from_hf_dir(p)
        elif p.is_file() and p.suffix == ".gguf":
            arch = from_gguf(p)
        elif not (m.name and lookup(m.name)):
            raise SpecError(
                f"model.path: {m.path!r} is neither a Hugging Face dir nor a .gguf file"
            )
    if arch is None and m.name:
        arch = lookup(m.name)
        if arch is None:
            from skybroker.models import KNOWN_MODELS

            known = ", ".join(a.name for a in KNOWN_MODELS.values())
            raise SpecError(f"model.name: {m.name!r} is not a model the planner knows; give "
                            f"model.path or model.architecture, or one of: {known}")  # fmt: skip
        arch = replace(arch, name=m.name)
    assert arch is not None
    return replace(arch, dtype=m.dtype) if m.dtype else arch


def required_len(spec: DeploymentSpec, arch: ModelArch, classes: list[RequestClass]) -> int:
    longest = max(i + o for c in classes for i, o in zip(c.input_lens, c.output_lens, strict=True))
    want = spec.engine.max_model_len or longest
    return min(want, arch.max_position_embeddings)


@dataclass(frozen=True)
class ReplicaPerf:
    hw: Hardware
    tp: int
    kv_tokens: int
    caps: tuple[CapacityResult, ...]  # per request class
    source: str
    notes: tuple[str, ...] = ()  # measured profiles skipped, and why
    exact: bool = True  # False: caps are upper bounds (`rate_bound`), not searched yet


def gpu_replica(arch: ModelArch, spec: DeploymentSpec, catalog: Catalog, gpu: str,
                max_count: int, need_len: int) -> tuple[Hardware, int] | None:  # fmt: skip
    """(hardware of one replica, its KV tokens) with the smallest TP that fits, or None."""
    g = catalog.gpus.get(gpu)
    if g is None:
        return None
    e = spec.engine
    tps = [e.tensor_parallel] if isinstance(e.tensor_parallel, int) else [1, 2, 4, 8, 16]
    for tp in tps:
        if (
            tp > max_count
            or arch.num_heads % tp
            or (arch.num_kv_heads % tp and tp > arch.num_kv_heads)
        ):
            continue
        hw = Hardware("gpu", gpu, tp, g.memory_gib, g.memory_bandwidth_gbs, g.fp16_tflops,
                      g.interconnect_gbs)  # fmt: skip
        kv = kv_capacity_tokens(arch, hw, gpu_memory_utilization=e.gpu_memory_utilization,
                                max_num_batched_tokens=e.max_num_batched_tokens)  # fmt: skip
        if kv >= need_len:
            return hw, kv
    return None


def replica_perf(arch: ModelArch, hw: Hardware, kv_tokens: int, spec: DeploymentSpec,
                 classes: list[RequestClass],
                 model: RooflineModel | None = None) -> ReplicaPerf:  # fmt: skip
    return replica_perfs([(arch, hw, kv_tokens, model)], spec, classes)[0]


def replica_perfs(replicas: list[tuple[ModelArch, Hardware, int, RooflineModel | None]],
                  spec: DeploymentSpec, classes: list[RequestClass], *,
                  exact: bool = True) -> list[ReplicaPerf]:  # fmt: skip
    """Capacity per request class of each replica kind: a measured profile when one matches,
    else the roofline. Every distinct search runs once (`max_rates`, in parallel when cold).
    With exact=False nothing is searched: capacities not in the cache are upper bounds."""
    e, s = spec.engine, spec.slo
    slo = SLOTarget(s.ttft_ms / 1000, s.tpot_ms / 1000, s.percentile)
    steps, jobs = [], []
    for arch, hw, kv_tokens, model in replicas:
        notes: list[str] = []
        step = find_profile(arch, hw, e.profiles, notes) or model or RooflineModel(arch, hw)
        cfg = SchedulerConfig(e.max_num_seqs, e.max_num_batched_tokens,
                              kv_tokens // e.block_size, e.block_size)  # fmt: skip
        steps.append((step, notes))
        jobs += [(step, cfg, c, slo) for c in classes]
    if exact:
        caps: list[CapacityResult | None] = list(max_rates(jobs, num_requests=SIM_REQUESTS))
    else:
        caps = cached_rates(jobs, num_requests=SIM_REQUESTS)
    k = len(classes)
    out = []
    for i, ((_, hw, kv, _), (step, notes)) in enumerate(zip(replicas, steps, strict=True)):
        mine = caps[i * k : (i + 1) * k]
        got = tuple(c or rate_bound(*jobs[i * k + b]) for b, c in enumerate(mine))
        out.append(ReplicaPerf(hw, hw.count if hw.kind == "gpu" else 1, kv, got, step.source,
                               tuple(notes), all(c is not None for c in mine)))  # fmt: skip
    return out


# --- offerings and users --------------------------------------------------------------------


def local_offering() -> Offering:
    hw = cpu_hardware()
    return Offering(
        "local", "local", "localhost", "cpu", 0, 0.0, hw.count, hw.memory_gib, 0.0, None
    )


def allowed_offerings(spec: DeploymentSpec, catalog: Catalog,
                      blocklist: frozenset[OfferingKey]) -> list[tuple[Offering, bool, float]]:  # fmt: skip
    """(offering, spot, $/h) for each market the constraints allow, zones collapsed."""
    c = spec.constraints
    markets = {"never": [False], "allowed": [False, True], "prefer": [False, True]}[c.spot]
    best: dict[OfferingKey, tuple[Offering, bool, float]] = {}
    gpus = {g.lower() for g in c.gpus} if c.gpus else None
    excl_g = {g.lower() for g in c.exclude_gpus}
    for o in catalog.offerings:
        if c.clouds and o.cloud not in c.clouds:
            continue
        if (c.regions and o.region not in c.regions) or o.region in c.exclude_regions:
            continue
        if (gpus is not None and o.gpu.lower() not in gpus) or o.gpu.lower() in excl_g:
            continue
        for spot in markets:
            price = o.hourly(spot)
            key = (o.cloud, o.region, o.instance_type, spot)
            if price is None or key in blocklist:
                continue
            if key not in best or price < best[key][2]:
                best[key] = (o, spot, price)
    return list(best.values())


def user_location(name: str, lat: float | None, lon: float | None,
                  catalog: Catalog) -> tuple[float, float] | None:  # fmt: skip
    if lat is not None and lon is not None:
        return (lat, lon)
    if name in USER_AREAS:
        return USER_AREAS[name]
    cloud, _, region = name.replace(":", "/").rpartition("/")
    for r in catalog.regions.values():
        if r.region == region and (not cloud or r.cloud == cloud):
            return (r.lat, r.lon)
    if name == "any":
        return None
    raise SpecError(f"workload.users: {name!r} is not a place the planner knows; use an area "
                    f"({', '.join(USER_AREAS)}), a cloud region (e.g. aws/us-east-1), or give "
                    f"lat and lon")  # fmt: skip


def user_reach(
    spec: DeploymentSpec, catalog: Catalog, locations: set[str]
) -> dict[str, frozenset[str]]:
    from skybroker.catalog.geo import rtt_ms

    limit = spec.slo.max_rtt_ms
    users = spec.workload.users
    reach = {}
    for u in spec.workload.user_shares():
        ur = users.get(u)
        if spec.infra == "local":  # one machine: every user reaches it
            reach[u] = frozenset(locations)
            continue
        loc = user_location(u, ur.lat if ur else None, ur.lon if ur else None, catalog)
        if limit is None or loc is None:
            reach[u] = frozenset(locations)
            continue
        ok = set()
        for l_ in locations:
            cloud, region = l_.split("/", 1)
            r = catalog.region_of(cloud, region)
            if r is not None and rtt_ms(loc, r) <= limit:
                ok.add(l_)
        reach[u] = frozenset(ok)
    return reach


# --- the plan -------------------------------------------------------------------------------


def make_plan(spec: DeploymentSpec, catalog: Catalog | None = None,
              blocklist: frozenset[OfferingKey] = frozenset(), *,
              time_limit: float = 20.0, baselines: bool = True) -> Plan:  # fmt: skip
    """The cheapest placement of `spec` that meets its SLO, or InfeasibleError."""
    t0 = time.perf_counter()
    arch = resolve_arch(spec.model, spec.infra)
    if spec.infra == "local":  # the engine runs fp32 on CPU
        arch = replace(arch, dtype="float32")
    ins, outs = workload_samples(spec.workload)
    classes = request_classes(ins, outs)
    need_len = required_len(spec, arch, classes)
    prefetch_disk_cache()
    if spec.infra == "local":
        catalog = Catalog(sources=["this machine"])
        rows = [(local_offering(), False, 0.0)]
        if ("local", "local", "localhost", False) in blocklist:
            rows = []
    else:
        if catalog is None:
            from skybroker.catalog import load_catalog

            catalog = load_catalog()
        rows = allowed_offerings(spec, catalog, blocklist)
    if not rows:
        raise InfeasibleError(_no_offering_reason(spec))
    perf = _perf_per_gpu(arch, spec, catalog, classes, rows, need_len, exact=False)
    problem, meta = build_problem(spec, catalog, classes, rows, perf)
    if not problem.offerings:  # no replica fits in memory
        raise InfeasibleError(_no_fit_reason(arch, need_len, rows, spec))
    perf_s = [time.perf_counter() - t0]

    def refine(gpus: set[str]) -> tuple[Problem, _Meta]:
        """Search the capacities of these GPU kinds; the problem with them in."""
        t1 = time.perf_counter()
        todo = sorted(g for g in gpus if (rp := perf.get(g)) is not None and not rp.exact)
        if todo:
            exact = replica_perfs([(arch, perf[g].hw, perf[g].kv_tokens, None) for g in todo],
                                  spec, classes)  # fmt: skip
            perf.update(zip(todo, exact, strict=True))
            flush_disk_cache()
        perf_s[0] += time.perf_counter() - t1
        return _with_perf(problem, meta, perf)

    # Capacities are searched only where the optimum needs them: solved on upper bounds, the
    # problem is a relaxation; when its optimum uses only searched offerings it is the real
    # one. The LP relaxation (fast) picks what to search first, the MILP has the last word.
    relax = True
    while True:
        sol = solve(problem, options=Options(time_limit=time_limit, relaxation=relax))
        todo = {meta.rows[i][0].gpu for i in sol.counts if not meta.perf[i].exact}
        if todo:
            problem, meta = refine(todo)
        elif relax and sol.status != "infeasible":
            relax = False
        else:
            break
    if sol.status == "infeasible":
        problem, meta = refine(set(perf))
        raise InfeasibleError(explain_infeasible(spec, arch, problem, classes, meta, time_limit))
    plan = Plan(spec, _placements(problem, sol, meta, classes), sol.cost,
                _egress(problem, sol), SolverInfo(sol.status, sol.solve_time_s, sol.gap),
                model=arch.describe(),
                request_classes=[{"name": c.name, "share": round(c.share, 4),
                                  "mean_input": round(c.mean_input, 1),
                                  "mean_output": round(c.mean_output, 1)} for c in classes])  # fmt: skip
    if baselines:
        plan.baselines, plan.baseline_notes = compute_baselines(problem, meta, time_limit, refine)
    plan.perf_notes = sorted({n for rp in perf.values() if rp for n in rp.notes})
    plan.solver = SolverInfo(sol.status, sol.solve_time_s, sol.gap, sol.build_time_s, perf_s[0],
                             len(rows), len(problem.offerings), sol.num_offerings,
                             sol.num_components, sol.solver, sorted(g for g, rp in perf.items()
                                                                    if rp and rp.exact))  # fmt: skip
    return plan


def _perf_per_gpu(arch: ModelArch, spec: DeploymentSpec, catalog: Catalog,
                  classes: list[RequestClass], rows: list, need_len: int, *,
                  exact: bool = True) -> dict[str, ReplicaPerf | None]:  # fmt: skip
    """Per GPU kind, one replica's performance (None: the model does not fit); with
    exact=False, upper bounds where the capacity searches have not run (`replica_perfs`)."""
    perf: dict[str, ReplicaPerf | None] = {}
    if spec.infra == "local":
        hw = cpu_hardware()
        model = cpu_roofline(arch, hw)
        kv = kv_capacity_tokens(model.arch, hw, kv_cache_gib=spec.engine.kv_cache_gib)
        perf["cpu"] = (
            replica_perf(model.arch, hw, kv, spec, classes, model) if kv >= need_len else None
        )
        return perf
    max_count: dict[str, int] = {}
    for o, _, _ in rows:
        max_count[o.gpu] = max(max_count.get(o.gpu, 0), o.gpu_count)
    fits = {gpu: gpu_replica(arch, spec, catalog, gpu, count, need_len)
            for gpu, count in sorted(max_count.items())}  # fmt: skip
    fitting = [(gpu, f) for gpu, f in fits.items() if f is not None]
    done = replica_perfs([(arch, hw, kv, None) for _, (hw, kv) in fitting], spec, classes,
                         exact=exact)  # fmt: skip
    perf = {gpu: None for gpu in fits} | {g: rp for (g, _), rp in zip(fitting, done, strict=True)}
    return perf


@dataclass
class _Meta:
    rows: list[tuple[Offering, bool, float]]  # per offering class
    perf: list[ReplicaPerf]
    dp: list[int]
    all_perf: dict[str, ReplicaPerf | None]
    locations: set[str]


def build_problem(spec: DeploymentSpec, catalog: Catalog, classes: list[RequestClass],
                  rows: list, perf: dict[str, ReplicaPerf | None]) -> tuple[Problem, _Meta]:  # fmt: skip
    c, w = spec.constraints, spec.workload
    offs, meta_rows, meta_perf, dps = [], [], [], []
    gb_out = [3600 * cl.mean_output * w.response_bytes_per_token / 1e9 for cl in classes]
    egresses: dict[str, tuple[float, ...]] = {}  # per cloud
    mus: dict[tuple[str, int], tuple[float, ...]] = {}  # per (GPU kind, data parallel)
    for o, spot, price in rows:
        rp = perf.get(o.gpu)
        if rp is None or (o.gpu_count and o.gpu_count < rp.tp):
            continue
        dp = o.gpu_count // rp.tp if o.gpu_count else 1
        mu = mus.get((o.gpu, dp))
        if mu is None:  # all 0: kept so the reason can name the SLO
            mu = mus[o.gpu, dp] = tuple(dp * cap.rate for cap in rp.caps)
        egress = egresses.get(o.cloud)
        if egress is None:
            eg = catalog.egress.get(o.cloud)
            egress = egresses[o.cloud] = tuple(g * (eg.internet_per_gb if eg else 0.0)
                                               for g in gb_out)  # fmt: skip
        offs.append(OfferingClass((o.cloud, o.region, o.instance_type, spot), o.cloud,
                                  f"{o.cloud}/{o.region}", price, spot, mu, egress,
                                  max_count=1 if o.cloud == "local" else None))  # fmt: skip
        meta_rows.append((o, spot, price))
        meta_perf.append(rp)
        dps.append(dp)
    locations = {f"{o.cloud}/{o.region}" for o, _, _ in rows}
    shares = w.user_shares()
    demand = {u: tuple(w.rate * s * cl.share for cl in classes) for u, s in shares.items()}
    reach = user_reach(spec, catalog, locations)
    problem = Problem(offs, demand, reach, c.min_replicas, c.spot_share_limit(),
                      c.max_region_share, c.max_cloud_share, c.budget_per_hour)  # fmt: skip
    return problem, _Meta(meta_rows, meta_perf, dps, perf, locations)


def _with_perf(
    p: Problem, meta: _Meta, perf: dict[str, ReplicaPerf | None]
) -> tuple[Problem, _Meta]:
    """`p` with each offering's capacity taken from `perf` (after some searches ran)."""
    offs, rps = [], []
    for oc, (o, _, _), old, dp in zip(p.offerings, meta.rows, meta.perf, meta.dp, strict=True):
        rp = perf[o.gpu] or old
        if rp is not old:
            oc = replace(oc, mu=tuple(dp * cap.rate for cap in rp.caps))
        offs.append(oc)
        rps.append(rp)
    return replace(p, offerings=offs), replace(meta, perf=rps, all_perf=perf)


def _egress(p: Problem, s: Solution) -> float:
    return sum(p.offerings[i].egress[b] * v for (i, b), v in s.rates.items())


def _placements(
    p: Problem, s: Solution, meta: _Meta, classes: list[RequestClass]
) -> list[Placement]:
    out = []
    for i, n in sorted(s.counts.items(), key=lambda kv: -kv[1] * p.offerings[kv[0]].price):
        o, spot, price = meta.rows[i]
        rp = meta.perf[i]
        rates = {b: v for (j, b), v in s.rates.items() if j == i}
        served = sum(rates.values())
        mix = rates if served > 0 else {b: c.share for b, c in enumerate(classes)}
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
        used = [rp.caps[b] for b in mix] or list(rp.caps)
        out.append(Placement(o, spot, n, rp.tp, 1 / inv if inv else 0.0,
                             max(c.ttft_s for c in used), max(c.tpot_s for c in used), serves,
                             rp.source, meta.dp[i], price))  # fmt: skip
    return out


# --- baselines ------------------------------------------------------------------------------


Refine = Callable[[set[str]], tuple[Problem, _Meta]]


def compute_baselines(p: Problem, meta: _Meta, time_limit: float,
                      refine: Refine | None = None) -> tuple[dict, dict]:  # fmt: skip
    """The two baselines' costs and notes. The cheapest single GPU kind is found best first:
    every kind's fleet is bounded from below by its LP relaxation (on upper bounds of its
    capacities where `p` holds only those), and only the most promising kind is searched
    (`refine(gpus)`) and solved exactly, until an exact cost is the lowest bound."""
    costs: dict[str, float | None] = {}
    notes: dict[str, str] = {}

    def single(p: Problem, meta: _Meta, gpu: str, relax: bool) -> float:
        sub = [oc for oc, (o, _, _) in zip(p.offerings, meta.rows, strict=True) if o.gpu == gpu]
        s = solve(replace(p, offerings=sub), options=Options(time_limit, relaxation=relax))
        return s.cost if s.status != "infeasible" else math.inf

    bound = {gpu: single(p, meta, gpu, True) for gpu in sorted({o.gpu for o, _, _ in meta.rows})}
    solved: set[str] = set()  # kinds whose bound is their exact fleet cost
    best = (math.inf, "")
    while bound:
        cost, gpu = min((c, g) for g, c in bound.items())
        if not math.isfinite(cost):
            break
        if gpu in solved:
            best = (cost, gpu)
            break
        rp = meta.all_perf[gpu]
        if refine is not None and rp is not None and not rp.exact:
            p, meta = refine({gpu})
        bound[gpu] = single(p, meta, gpu, False)
        solved.add(gpu)
    costs["cheapest_single_gpu"] = best[0] if best[1] else None
    notes["cheapest_single_gpu"] = (f"all replicas {best[1]} (best of each GPU kind solved alone)"
                                    if best[1] else "no single GPU kind meets the spec alone")  # fmt: skip
    costs["skypilot"], notes["skypilot"] = skypilot_baseline(p, meta, refine)
    return costs, notes


def skypilot_baseline(p: Problem, meta: _Meta,
                      refine: Refine | None = None) -> tuple[float | None, str]:  # fmt: skip
    """SkyPilot's way: the cheapest instance type that fits the model (and serves every request
    class within the SLO), replicated to meet the rate. It does not know RTT, so it is given
    the cheapest such instance reachable by all users, else one per user region. An offering
    whose capacities are upper bounds is searched (`refine`) only when it would be chosen: on
    bounds the candidates are a superset and each one's key (price, -capacity) no higher."""

    def mix_capacity(oc: OfferingClass, dem: list[float]) -> float:
        s = sum(dem)
        if s <= 0 or any(d > 0 and m <= 0 for d, m in zip(dem, oc.mu, strict=True)):
            return 0.0
        return 1 / sum(d / s / m for d, m in zip(dem, oc.mu, strict=True) if d > 0)

    def cheapest(users: list[str], min_n: int) -> tuple[float, str] | None:
        nonlocal p, meta
        dem = [sum(p.demand[u][b] for u in users) for b in range(p.num_classes)]
        while True:
            cands = [(i, oc) for i, oc in enumerate(p.offerings)
                     if all(oc.location in p.reach[u] for u in users)
                     and (p.max_spot_share >= 1 or not oc.spot) and mix_capacity(oc, dem) > 0]  # fmt: skip
            if not cands:
                return None
            i, oc = min(cands, key=lambda c: (c[1].price, -mix_capacity(c[1], dem)))
            if meta.perf[i].exact or refine is None:
                break
            p, meta = refine({meta.rows[i][0].gpu})
        n = max(math.ceil(sum(dem) / mix_capacity(oc, dem) - 1e-9), min_n)
        if oc.max_count is not None and n > oc.max_count:
            return None
        eg = sum(e * d for e, d in zip(oc.egress, dem, strict=True)) if oc.egress else 0.0
        return n * oc.price + eg, f"{n} x {oc.key[2]} in {oc.location}"

    whole = cheapest(list(p.demand), max(p.min_replicas, 1))
    if whole is not None:
        return whole
    parts = [cheapest([u], 1) for u in p.demand if sum(p.demand[u]) > 0]
    if any(x is None for x in parts):
        return None, "no single instance type fits and serves every request class"
    return sum(x[0] for x in parts if x), "; ".join(x[1] for x in parts if x)


# --- why infeasible -------------------------------------------------------------------------


def _no_offering_reason(spec: DeploymentSpec) -> str:
    c = spec.constraints
    parts = [f"{k}={v}" for k, v in (("clouds", c.clouds), ("regions", c.regions),
             ("gpus", c.gpus), ("spot", c.spot)) if v]  # fmt: skip
    return "no offering in the catalog matches the constraints (" + ", ".join(parts) + ")"


def _no_fit_reason(arch: ModelArch, need_len: int, rows: list, spec: DeploymentSpec) -> str:
    gib = arch.weight_bytes / 2**30
    biggest = max(rows, key=lambda r: r[0].gpu_count * r[0].gpu_memory_gib)[0]
    return (f"no allowed offering fits {arch.describe()}: it needs {gib:.1f} GiB of weights plus "
            f"KV cache for {need_len} tokens; the largest allowed is {biggest.instance_type} "
            f"({biggest.gpu_count} x {biggest.gpu} {biggest.gpu_memory_gib:g} GiB)"
            + (" (tensor_parallel fixed at "
               f"{spec.engine.tensor_parallel})" if spec.engine.tensor_parallel != "auto" else ""))  # fmt: skip


def explain_infeasible(spec: DeploymentSpec, arch: ModelArch, p: Problem,
                       classes: list[RequestClass], meta: _Meta, time_limit: float) -> str:  # fmt: skip
    s, c = spec.slo, spec.constraints
    pct = f"p{s.percentile:g}"
    for b, cl in enumerate(classes):
        if not any(oc.mu[b] > 0 for oc in p.offerings):
            best = min((rp.caps[b] for rp in meta.perf), key=lambda r: r.ttft_s)
            return (f"no allowed GPU meets the SLO (TTFT {pct} <= {s.ttft_ms:g} ms, TPOT {pct} <= "
                    f"{s.tpot_ms:g} ms) for requests like {cl.name} ({cl.share:.0%} of traffic); "
                    f"the best unloaded replica gives TTFT {best.ttft_s * 1000:.0f} ms, "
                    f"TPOT {best.tpot_s * 1000:.0f} ms")  # fmt: skip
    for u, dem in p.demand.items():
        near = [oc for oc in p.offerings if oc.location in p.reach[u]]
        if sum(dem) > 0 and not near:
            rtt = f" within {s.max_rtt_ms:g} ms" if s.max_rtt_ms else ""
            return f"no offering{rtt} of {u} fits {arch.describe()} and meets the SLO"
        for b, d in enumerate(dem):
            if d > 0 and not any(oc.mu[b] > 0 for oc in near):
                return (f"no offering within {s.max_rtt_ms:g} ms of {u} meets the SLO for requests "
                        f"like {classes[b].name}")  # fmt: skip
    relax = [
        ("budget", replace(p, budget=None)),
        ("max_spot_share", replace(p, max_spot_share=1.0)),
        ("max_region_share", replace(p, max_region_share=1.0)),
        ("max_cloud_share", replace(p, max_cloud_share=1.0)),
        ("min_replicas", replace(p, min_replicas=0)),
    ]
    for what, q in relax:
        sol = solve(q, time_limit=time_limit)
        if sol.status == "infeasible":
            continue
        if what == "budget":
            price = sol.cost - _egress(q, sol)
            return (f"budget ${c.budget_per_hour:g}/h is below the cheapest feasible "
                    f"${price:.2f}/h")  # fmt: skip
        if what == "max_spot_share":
            return (f"spot: only a share of {p.max_spot_share:g} of the traffic may run on spot, and "
                    f"the rest has no on-demand offering that meets the spec")  # fmt: skip
        if what == "max_region_share":
            nloc = len({oc.location for oc in p.offerings})
            return (f"max_region_share {c.max_region_share:g} needs at least "
                    f"{math.ceil(1 / c.max_region_share)} regions to serve from, within RTT of the "
                    f"users; {nloc} region(s) qualify")  # fmt: skip
        if what == "max_cloud_share":
            nc = len({oc.cloud for oc in p.offerings})
            return (f"max_cloud_share {c.max_cloud_share:g} needs at least "
                    f"{math.ceil(1 / c.max_cloud_share)} clouds; {nc} cloud(s) qualify")  # fmt: skip
        return f"min_replicas {c.min_replicas} cannot be placed within the other constraints"
    if any(oc.max_count for oc in p.offerings):
        # a replica serving the mix: sum_b rate * share_b / mu_b <= 1 (the ILP's capacity row)
        cap = 0.0
        for oc in p.offerings:
            load = sum(cl.share / m if m > 0 else math.inf
                       for m, cl in zip(oc.mu, classes, strict=True) if cl.share > 0)  # fmt: skip
            cap += (oc.max_count or 1) / load if load > 0 else 0.0
        if cap == 0:
            return ("this machine cannot meet the SLO for every request class of the workload "
                    "at any rate")  # fmt: skip
        return (f"this machine sustains about {cap:.2f} req/s of this workload within the SLO; "
                f"the spec asks for {spec.workload.rate:g} req/s")  # fmt: skip
    return "the constraints together admit no placement (each one alone can be met)"
