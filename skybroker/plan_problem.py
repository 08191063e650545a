"""The placement problem of a spec: allowed offerings, where users are, and the ILP's input.

`allowed_offerings` lists each market the constraints allow (zones collapsed); `user_reach`
the locations each user region reaches within the RTT limit; `build_problem` one offering
class per (offering, deployment configuration) with its capacity per request class, the
demand per user and class, and the constraints (`skybroker.optimizer.Problem`);
`with_warm` a re-plan's running replicas and launch costs on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from skybroker.catalog.schema import Catalog, Offering
from skybroker.models import ModelArch
from skybroker.optimizer import OfferingClass, Problem, Solution
from skybroker.perf.roofline import (
    GIB,
    activation_reserve_bytes,
    cpu_hardware,
    cpu_roofline,
    kv_capacity_tokens,
)
from skybroker.perf.workload import RequestClass
from skybroker.plan_perf import ConfigKey, ReplicaPerf
from skybroker.provision.ports import port_unreachable
from skybroker.spec import DeploymentSpec, SpecError

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


# One replica beside its weights and KV cache: the server and engine processes with torch
# (a replica of the tiny test model: about 0.65 GiB resident on a 2-core x86 VM).
LOCAL_RUNTIME_GIB = 1.0


def local_replicas(spec: DeploymentSpec, arch: ModelArch) -> int:
    """How many engine processes this machine holds: one per core at most, and as many as
    fit in 90% of its memory (fp32 weights, KV cache, activations, the process itself);
    `constraints.max_local_replicas` overrides it."""
    if spec.constraints.max_local_replicas is not None:
        return spec.constraints.max_local_replicas
    hw = cpu_hardware()
    fp32 = cpu_roofline(arch, hw).arch
    kv = max(0, kv_capacity_tokens(fp32, hw, kv_cache_gib=spec.engine.kv_cache_gib))
    need = (fp32.weight_bytes + kv * fp32.kv_bytes_per_token(4.0)
            + activation_reserve_bytes(fp32, 2048) + LOCAL_RUNTIME_GIB * GIB)  # fmt: skip
    return max(1, min(hw.count, int(0.9 * hw.memory_gib * GIB // need)))


def local_offering(replicas: int = 1) -> Offering:
    """This machine as an offering: each of `replicas` engine processes gets its share of
    the cores (`vcpus`, its torch threads) and memory."""
    hw = cpu_hardware()
    share = max(1, hw.count // replicas)
    return Offering(
        "local", "local", "localhost", "cpu", 0, 0.0, share, hw.memory_gib / replicas, 0.0, None
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
        if port_unreachable(o.cloud, o.region):  # replicas there could never be reached
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


# --- the problem ----------------------------------------------------------------------------


@dataclass
class Meta:
    """What each offering class of the Problem stands for."""

    rows: list[tuple[Offering, bool, float]]  # per offering class: offering, spot, $/h
    perf: list[ReplicaPerf]  # per offering class: its configuration's replica
    dp: list[int]  # per offering class: replicas per instance
    all_perf: dict[ConfigKey, ReplicaPerf | None]
    locations: set[str]
    # per offering class: its capacities' factor from simulating the mix it serves (1: the
    # linear rule holds; see `skybroker.plan_mix`)
    scale: dict[int, float] = field(default_factory=dict)

    def configs_of(self, gpu: str) -> list[ConfigKey]:
        return [k for k, rp in self.all_perf.items() if k[0] == gpu and rp is not None]


def _by_gpu(perf: dict[ConfigKey, ReplicaPerf | None]) -> dict[str, list[ReplicaPerf]]:
    out: dict[str, list[ReplicaPerf]] = {}
    for (gpu, _), rp in sorted(perf.items()):
        if rp is not None:
            out.setdefault(gpu, []).append(rp)
    return out


def build_problem(spec: DeploymentSpec, catalog: Catalog, classes: list[RequestClass],
                  rows: list, perf: dict[ConfigKey, ReplicaPerf | None],
                  local_max: int = 1) -> tuple[Problem, Meta]:  # fmt: skip
    """One offering class per (offering, configuration that fits its GPUs); the local
    machine holds at most `local_max` replicas."""
    c, w = spec.constraints, spec.workload
    offs, meta_rows, meta_perf, dps = [], [], [], []
    gb_out = [3600 * cl.mean_output * w.response_bytes_per_token / 1e9 for cl in classes]
    egresses: dict[str, tuple[float, ...]] = {}  # per cloud
    mus: dict[tuple[str, int, int], tuple[float, ...]] = {}  # per (GPU kind, TP, data parallel)
    configs = _by_gpu(perf)
    for o, spot, price in rows:
        for rp in configs.get(o.gpu, []):
            if o.gpu_count and o.gpu_count < rp.tp:
                continue
            dp = o.gpu_count // rp.tp if o.gpu_count else 1
            mu = mus.get((o.gpu, rp.tp, dp))
            if mu is None:  # all 0: kept so the reason can name the SLO
                mu = mus[o.gpu, rp.tp, dp] = tuple(dp * cap.rate for cap in rp.caps)
            egress = egresses.get(o.cloud)
            if egress is None:
                eg = catalog.egress.get(o.cloud)
                egress = egresses[o.cloud] = tuple(g * (eg.internet_per_gb if eg else 0.0)
                                                   for g in gb_out)  # fmt: skip
            offs.append(OfferingClass((o.cloud, o.region, o.instance_type, spot, rp.tp), o.cloud,
                                      f"{o.cloud}/{o.region}", price, spot, mu, egress,
                                      max_count=local_max if o.cloud == "local" else None))  # fmt: skip
            meta_rows.append((o, spot, price))
            meta_perf.append(rp)
            dps.append(dp)
    locations = {f"{o.cloud}/{o.region}" for o, _, _ in rows}
    shares = w.user_shares()
    demand = {u: tuple(w.rate * s * cl.share for cl in classes) for u, s in shares.items()}
    reach = user_reach(spec, catalog, locations)
    problem = Problem(offs, demand, reach, c.min_replicas, c.spot_share_limit(),
                      c.max_region_share, c.max_cloud_share, c.budget_per_hour,
                      spot_spread=spec.spot.spread if spec.spot else 1)  # fmt: skip
    return problem, Meta(meta_rows, meta_perf, dps, perf, locations)


@dataclass(frozen=True)
class Warm:
    """A re-plan of a running deployment: the replicas running per (cloud, region,
    instance type, spot, tensor parallel), and what starting one more costs: its price for
    `startup_s` (paid before it serves) plus `per_launch` $, over the `horizon_h` hours a
    plan is expected to hold (the optimizer's objective is $/h)."""

    running: dict[tuple, int]
    startup_s: float = 300.0
    per_launch: float = 0.0
    horizon_h: float = 1.0

    def launch_cost(self, price: float) -> float:
        return (price * self.startup_s / 3600 + self.per_launch) / self.horizon_h


def with_warm(p: Problem, warm: Warm | None) -> Problem:
    """`p` with `warm`'s running replicas as already-paid columns and every new replica's
    launch cost on the objective (`Problem.running`, `Problem.launch_cost`)."""
    if warm is None:
        return p
    index = {oc.key: i for i, oc in enumerate(p.offerings)}
    running = {index[k]: n for k, n in warm.running.items() if k in index and n > 0}
    return replace(p, running=running,
                   launch_cost=tuple(warm.launch_cost(oc.price) for oc in p.offerings))  # fmt: skip


def with_perf(p: Problem, meta: Meta, perf: dict[ConfigKey, ReplicaPerf | None],
              scale: dict[int, float] | None = None) -> tuple[Problem, Meta]:  # fmt: skip
    """`p` with each offering's capacity taken from `perf` (after some searches ran) times
    its mix factor (`scale`, default: meta's)."""
    scale = meta.scale if scale is None else scale
    offs, rps = [], []
    mus: dict[tuple[ConfigKey, int, float], tuple[float, ...]] = {}  # shared by offerings
    for i, (oc, old, dp) in enumerate(zip(p.offerings, meta.perf, meta.dp, strict=True)):
        rp = perf[old.config] or old
        f = scale.get(i, 1.0)
        if rp is not old or f != meta.scale.get(i, 1.0):
            mu = mus.get((rp.config, dp, f))
            if mu is None:
                mu = mus[rp.config, dp, f] = tuple(dp * cap.rate * f for cap in rp.caps)
            # the constructor, not dataclasses.replace: a 10x catalog has 26,000 of them
            oc = OfferingClass(oc.key, oc.cloud, oc.location, oc.price, oc.spot, mu, oc.egress,
                               oc.max_count)  # fmt: skip
        offs.append(oc)
        rps.append(rp)
    return replace(p, offerings=offs), replace(meta, perf=rps, all_perf=perf, scale=dict(scale))


def egress_cost(p: Problem, s: Solution) -> float:
    """$/h of egress of a solution."""
    return sum(p.offerings[i].egress[b] * v for (i, b), v in s.rates.items())
