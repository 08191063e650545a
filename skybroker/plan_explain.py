"""Why a spec has no placement, in words: the first constraint that alone rules it out."""

from __future__ import annotations

import math
from dataclasses import replace

from skybroker.models import ModelArch
from skybroker.optimizer import Problem, solve
from skybroker.perf.workload import RequestClass
from skybroker.plan_problem import Meta, egress_cost
from skybroker.spec import DeploymentSpec


def no_offering_reason(spec: DeploymentSpec) -> str:
    c = spec.constraints
    parts = [f"{k}={v}" for k, v in (("clouds", c.clouds), ("regions", c.regions),
             ("gpus", c.gpus), ("spot", c.spot)) if v]  # fmt: skip
    return "no offering in the catalog matches the constraints (" + ", ".join(parts) + ")"


def no_fit_reason(arch: ModelArch, need_len: int, rows: list, spec: DeploymentSpec) -> str:
    gib = arch.weight_bytes / 2**30
    biggest = max(rows, key=lambda r: r[0].gpu_count * r[0].gpu_memory_gib)[0]
    return (f"no allowed offering fits {arch.describe()}: it needs {gib:.1f} GiB of weights plus "
            f"KV cache for {need_len} tokens; the largest allowed is {biggest.instance_type} "
            f"({biggest.gpu_count} x {biggest.gpu} {biggest.gpu_memory_gib:g} GiB)"
            + (" (tensor_parallel fixed at "
               f"{spec.engine.tensor_parallel})" if spec.engine.tensor_parallel != "auto" else ""))  # fmt: skip


def _serving_locations(p: Problem) -> set[str]:
    """Locations with an offering that serves some class and that a user with demand reaches
    (within the RTT limit)."""
    users = [u for u, d in p.demand.items() if sum(d) > 0]
    return {oc.location for oc in p.offerings
            if any(oc.mu) and any(oc.location in p.reach[u] for u in users)}  # fmt: skip


def _margin_note(meta: Meta) -> str:
    m = max((rp.margin for rp in meta.perf), default=0.0)
    if m <= 0:
        return ""
    return (
        f" with steps {m:.0%} slower than predicted (the plan's headroom; slo.margin sets "
        f"it, 0 plans to the edge)"
    )


def explain_infeasible(spec: DeploymentSpec, arch: ModelArch, p: Problem,
                       classes: list[RequestClass], meta: Meta, time_limit: float) -> str:  # fmt: skip
    s, c = spec.slo, spec.constraints
    pct = f"p{s.percentile:g}"
    for b, cl in enumerate(classes):
        if not any(oc.mu[b] > 0 for oc in p.offerings):
            best = min((rp.caps[b] for rp in meta.perf), key=lambda r: r.ttft_s)
            return (f"no allowed GPU meets the SLO (TTFT {pct} <= {s.ttft_ms:g} ms, TPOT {pct} <= "
                    f"{s.tpot_ms:g} ms) for requests like {cl.name} ({cl.share:.0%} of traffic); "
                    f"the best unloaded replica gives TTFT {best.ttft_s * 1000:.0f} ms, "
                    f"TPOT {best.tpot_s * 1000:.0f} ms" + _margin_note(meta))  # fmt: skip
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
            return (f"budget ${c.budget_per_hour:g}/h is below the cheapest feasible "
                    f"${sol.cost:.2f}/h (instances ${sol.cost - egress_cost(q, sol):.2f}/h + egress "
                    f"${egress_cost(q, sol):.2f}/h)")  # fmt: skip
        if what == "max_spot_share":
            return (f"spot: only a share of {p.max_spot_share:g} of the traffic may run on spot, and "
                    f"the rest has no on-demand offering that meets the spec")  # fmt: skip
        if what == "max_region_share":
            near = _serving_locations(p)
            named = f": {', '.join(sorted(near))}" if 0 < len(near) <= 4 else ""
            rtt = f"within {s.max_rtt_ms:g} ms RTT of the users" if s.max_rtt_ms else "in all"
            return (f"max_region_share {c.max_region_share:g} needs at least "
                    f"{math.ceil(1 / c.max_region_share)} regions to serve from; {len(near)} "
                    f"region(s) {rtt} can serve the model{named}")  # fmt: skip
        if what == "max_cloud_share":
            nc = len({loc.split("/", 1)[0] for loc in _serving_locations(p)})
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
