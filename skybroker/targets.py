"""What a deployment's plan asks for: its targets, each replica's launch spec, and failover.

A target is one placement of the plan as a JSON-able row (offering key, replicas, tensor
parallel, planned capacity, $/h, vCPUs); the store keeps them as the deployment's desired
state. `replica_spec` turns a replica row into what a provisioner launches (keys and hub
tokens go into its secrets, never into the store). `replan` blocklists an offering that
had no capacity and re-solves the plan without it; `set_targets` makes new targets the
desired state, keeping each replica on its offering's target.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from skybroker.keys import replica_api_key
from skybroker.provision import ReplicaSpec
from skybroker.state import Deployment, Replica, Store

Planner = Callable[..., Any]  # (spec, blocklist=frozenset) -> Plan
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # passed to replicas, never stored
# The engine reads its key from ENGINE_API_KEY (SKYBROKER_API_KEY in older engines).
REPLICA_KEY_ENVS = ("ENGINE_API_KEY", "SKYBROKER_API_KEY")


def targets_from_plan(plan: Any) -> list[dict[str, Any]]:
    """The desired replicas of a plan, as JSON-able rows (one per placement)."""
    targets = []
    for p in plan.placements:
        o = p.offering
        targets.append(
            {
                "key": list(p.key),
                "gpu": o.gpu,
                "gpu_count": o.gpu_count,
                "replicas": int(p.replicas),
                "tensor_parallel": int(p.tensor_parallel),
                "data_parallel": int(getattr(p, "data_parallel", 1) or 1),
                "capacity_rps": float(p.capacity_rps),
                "price_per_hour": float(getattr(p, "price_per_hour", 0.0) or 0.0),
                "vcpus": float(getattr(o, "vcpus", 0) or 0),
            }
        )
    return targets


def default_planner(spec: Any, blocklist: frozenset = frozenset(), warm: Any = None) -> Any:
    """Failover's re-plan: the cheapest plan without the blocked offerings (with `warm`, a
    `skybroker.plan_problem.Warm`: counting what switching from the running replicas costs).
    No baselines: they only explain a plan to a person, and failover should be quick."""
    from skybroker.plan import make_plan

    return make_plan(spec, blocklist=blocklist, baselines=False, warm=warm)


def spec_for_load(spec: Any, rate: float, mean_in: float = 0.0, mean_out: float = 0.0) -> Any:
    """`spec` with its workload at `rate` req/s and its token lengths scaled to the observed
    means (0: as planned), and the autoscaler's min_replicas as the plan's floor."""
    from skybroker.perf.workload import workload_samples

    w = spec.workload
    update: dict[str, Any] = {"rate": max(rate, 1e-3), "schedule": None}
    if (mean_in > 0 or mean_out > 0) and not w.trace:
        ins, outs = workload_samples(w)
        for field, mean, planned in (
            ("input_tokens", mean_in, ins),
            ("output_tokens", mean_out, outs),
        ):
            if mean > 0:
                update[field] = _scaled(getattr(w, field), mean / float(planned.mean()))
    new = spec.model_copy(update={"workload": w.model_copy(update=update)})
    if spec.autoscale is not None:
        c = spec.constraints.model_copy(update={"min_replicas": spec.autoscale.min_replicas})
        new = new.model_copy(update={"constraints": c})
    return new


def _scaled(dist: Any, ratio: float) -> Any:
    if abs(ratio - 1) < 0.05:  # within noise: the planned shape (and its cached capacities)
        return dist
    if dist.histogram is not None:
        hist = [(max(1, round(t * ratio)), w) for t, w in dist.histogram]
        return dist.model_copy(update={"histogram": hist})
    fields = ("mean", "p50", "p90", "p99")
    up = {f: getattr(dist, f) * ratio for f in fields if getattr(dist, f) is not None}
    if dist.max is not None:
        up["max"] = max(1, round(dist.max * ratio))
    return dist.model_copy(update=up)


def load_planner(
    spec: Any,
    blocklist: frozenset = frozenset(),
    planner: Planner | None = None,
    startup_s: float = 300.0,
    per_launch: float = 0.0,
    horizon_h: float = 1.0,
) -> Any:
    """The autoscaler's re-plan: (capacity req/s, mean input, mean output, running targets)
    -> targets, from the cheapest plan for that load (the planner's ILP, no baselines),
    warm-started from the running targets: keeping one of their replicas costs its price,
    a new one its price plus its startup x $/h and `per_launch`, over `horizon_h`."""
    solve = planner or default_planner

    def replan(
        rate: float, mean_in: float, mean_out: float, running: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        from skybroker.plan_problem import Warm

        load = spec_for_load(spec, rate, mean_in, mean_out)
        if not running:
            return targets_from_plan(solve(load, blocklist))
        warm = Warm(running_counts(running), startup_s, per_launch, horizon_h)
        return targets_from_plan(solve(load, blocklist, warm=warm))

    return replan


def running_counts(targets: list[dict[str, Any]]) -> dict[tuple, int]:
    """Replicas per (cloud, region, instance type, spot, tensor parallel) of `targets`."""
    out: dict[tuple, int] = {}
    for t in targets:
        key = (*t["key"], int(t.get("tensor_parallel") or 1))
        out[key] = out.get(key, 0) + int(t["replicas"])
    return out


def describe_key(key: Any) -> str:
    cloud, region, instance_type, spot = key
    return f"{cloud}/{region}/{instance_type}{' (spot)' if spot else ''}"


def plan_summary(targets: list[dict[str, Any]]) -> str:
    parts = [f"{t['replicas']} x {describe_key(t['key'])}" for t in targets]
    cost = sum(t["replicas"] * t["price_per_hour"] for t in targets)
    return f"{', '.join(parts) or 'nothing'} (${cost:.2f}/h)"


def replica_spec(dep: Deployment, rep: Replica) -> ReplicaSpec:
    """What the provisioner launches for replica `rep` of `dep`."""
    t = dep.targets[rep.target]
    model = dep.spec["model"]
    eng = dep.spec.get("engine", {})
    args: dict[str, Any] = {
        "max_model_len": eng.get("max_model_len"),
        "max_num_seqs": eng.get("max_num_seqs"),
        "max_num_batched_tokens": eng.get("max_num_batched_tokens"),
        "block_size": eng.get("block_size"),
    }
    if dep.infra == "local":
        args["kv_cache_gib"] = eng.get("kv_cache_gib")
    else:
        args["gpu_memory_utilization"] = eng.get("gpu_memory_utilization")
    secrets = {k: os.environ[k] for k in SECRET_ENVS if os.environ.get(k)}
    secrets |= dict.fromkeys(REPLICA_KEY_ENVS, replica_api_key(rep.name, rep.created_at))
    envs = {}
    if dep.infra == "local":  # replicas share this machine: each its share of the cores
        envs["OMP_NUM_THREADS"] = str(max(1, int(t.get("vcpus") or 1)))
    cloud, region, instance_type, spot = t["key"]
    return ReplicaSpec(
        name=rep.name,
        deployment=dep.name,
        model=model.get("path") or model["name"],
        served_model_name=model.get("name") or dep.name,
        cloud=cloud,
        region=region,
        instance_type=instance_type,
        spot=bool(spot),
        gpu=t.get("gpu"),
        gpu_count=int(t.get("gpu_count") or 0),
        tensor_parallel_size=int(t.get("tensor_parallel") or 1),
        data_parallel=int(t.get("data_parallel") or 1),
        engine_args={k: v for k, v in args.items() if v is not None},
        envs=envs,
        secrets=secrets,
    )


def set_targets(
    store: Store, dep: Deployment, targets: list[dict[str, Any]], plan: Any = None
) -> Deployment:
    """Make `targets` the desired state. Replicas keep their offering's new target index; the
    others are retired by the controller's filling (drained where they served)."""
    index = {tuple(t["key"]): i for i, t in enumerate(targets)}
    for rep in store.list_replicas(dep.name):
        if rep.offering_key in index and rep.target != index[rep.offering_key]:
            store.update_replica(rep.name, target=index[rep.offering_key])
    fields: dict[str, Any] = {"targets": targets}
    if plan is not None:
        fields["plan"] = plan.to_dict()
    return store.update_deployment(dep.name, **fields)


# (capacity req/s to plan for, mean input tokens, mean output tokens): an autoscaled
# deployment's observed load with its headroom (`Scaling.sizing`), what a re-plan sizes for
Sizing = tuple[float, float, float]


def solve(
    planner: Planner, dep: Deployment, blocklist: set[tuple], load: Sizing | None = None
) -> Any:
    """The planner's plan for `dep`'s spec without the `blocklist` offerings, for `load`
    when given (else for `workload.rate`); raises the planner's error when nothing feasible
    is left."""
    from skybroker.spec import DeploymentSpec

    spec = DeploymentSpec.model_validate(dep.spec)
    if load is not None:
        spec = spec_for_load(spec, *load)
    return planner(spec, blocklist=frozenset(blocklist))


Shape = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


def replan(
    store: Store,
    planner: Planner,
    dep: Deployment,
    key: Any,
    shape: Shape | None = None,
    load: Sizing | None = None,
) -> str | None:
    """Blocklist offering `key` and re-solve the plan without it (once per offering), for
    `load` when given (an autoscaled deployment's observed load, else `workload.rate`);
    `shape` (old targets, new targets) -> targets may trim the new ones. The reason to fail
    the deployment when nothing feasible is left, else None."""
    if tuple(key) in {tuple(k) for k in dep.blocklist}:
        return None
    blocklist = {tuple(k) for k in dep.blocklist} | {tuple(key)}
    dep = store.update_deployment(dep.name, blocklist=sorted(blocklist))
    try:
        plan = solve(planner, dep, blocklist, load)
    except Exception as e:  # InfeasibleError: nothing left that meets the spec
        return f"no feasible plan without {describe_key(key)}: {e}"
    targets = targets_from_plan(plan)
    if shape is not None:
        targets = shape(dep.targets, targets)
    old = plan_summary(dep.targets)
    set_targets(store, dep, targets, plan)
    sized = "" if load is None else f" for {load[0]:.2f} req/s (the observed load)"
    store.add_event(
        dep.name,
        "failover",
        f"re-planned without {describe_key(key)}{sized}: {plan_summary(targets)} (was {old})",
        data={"blocked": list(key), "targets": targets},
    )
    return None
