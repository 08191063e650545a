"""The controller: keeps each deployment's replicas as its plan says, and routes to them.

Desired state is the plan's placements ("targets": offering, replicas, tensor parallel,
planned capacity); actual state is the store's replica rows plus what provisioners and
`/health` probes report. `reconcile_once()` closes the gap: it launches missing replicas
(in worker threads, so probing goes on), marks replicas ready when /health answers 200 (after
an initial delay), replaces dead, preempted or long-unhealthy ones, and on a CapacityError
blocklists the offering and re-solves the plan without it (failover), recording events.

A replica row exists before its launch starts and names everything the provisioner creates,
so a launch that fails half-way (or a broker that dies mid-launch) leaves nothing running the
store does not know about. A restarted controller re-adopts live replicas and cleans up the
rest. One router per deployment (`skybroker.router`) serves its OpenAI endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from skybroker.provision import (
    CapacityError,
    Provisioner,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    get_provisioner,
)
from skybroker.provision.local import free_port
from skybroker.router import ReplicaTarget, Router, RouterServer
from skybroker.state import (
    Deployment,
    DeploymentStatus,
    Event,
    Replica,
    ReplicaStatus,
    StateError,
    Store,
    default_home,
)

log = logging.getLogger(__name__)

RUNNING_STATUSES = (ReplicaStatus.STARTING, ReplicaStatus.READY, ReplicaStatus.NOT_READY)
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # passed to replicas, never stored


@dataclass
class ProbeConfig:
    """Readiness probing of replicas' /health."""

    timeout_s: float = 2.0  # per probe
    initial_delay_s: float = 0.0  # after launch, before the first probe
    startup_timeout_s: float = 900.0  # launch -> first 200, else replaced
    failure_threshold: int = 2  # failed probes in a row: READY -> NOT_READY
    unhealthy_timeout_s: float = 30.0  # NOT_READY this long -> replaced
    # Crash loops: failures in a row (launch errors, replicas that die or never get ready)
    # delay the next launch by backoff_base_s * 2**(n-1), at most backoff_max_s; after
    # max_launch_failures the deployment is FAILED. A replica launched after the last
    # failure that stays ready for stable_s ends the run. Preemptions do not count.
    max_launch_failures: int = 5
    backoff_base_s: float = 2.0
    backoff_max_s: float = 120.0
    stable_s: float = 60.0


@dataclass
class FailureRun:
    """A deployment's failures in a row, and when its next launch may start."""

    count: int = 0
    last_at: float = 0.0
    next_launch_at: float = 0.0
    last: str = ""


Planner = Callable[..., Any]  # (spec, blocklist=frozenset) -> Plan


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
            }
        )
    return targets


def _default_planner(spec: Any, blocklist: frozenset = frozenset()) -> Any:
    """Failover's re-plan: the cheapest plan without the blocked offerings. No baselines:
    they only explain a plan to a person, and failover should be quick."""
    from skybroker.plan import make_plan

    return make_plan(spec, blocklist=blocklist, baselines=False)


def _describe_key(key: Any) -> str:
    cloud, region, instance_type, spot = key
    return f"{cloud}/{region}/{instance_type}{' (spot)' if spot else ''}"


def _plan_summary(targets: list[dict[str, Any]]) -> str:
    parts = [f"{t['replicas']} x {_describe_key(t['key'])}" for t in targets]
    cost = sum(t["replicas"] * t["price_per_hour"] for t in targets)
    return f"{', '.join(parts) or 'nothing'} (${cost:.2f}/h)"


class Controller:
    """Owns deployments: desired vs actual replicas, health, failover, one router each."""

    def __init__(
        self,
        store: Store,
        provisioners: dict[str, Provisioner] | None = None,
        *,
        planner: Planner | None = None,
        probe: ProbeConfig | None = None,
        router_host: str = "127.0.0.1",
        serve_routers: bool = True,
        max_parallel_launches: int = 8,
        adopt: bool = True,
    ) -> None:
        self.store = store
        self.provisioners: dict[str, Provisioner] = dict(provisioners or {})
        self.planner = planner or _default_planner
        self.probe = probe or ProbeConfig()
        self.router_host = router_host
        self.serve_routers = serve_routers
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_parallel_launches, thread_name_prefix="launch")
        self._launches: dict[str, Future[ReplicaHandle]] = {}
        self._routers: dict[str, Router] = {}
        self._servers: dict[str, RouterServer] = {}
        self._probed_at: dict[str, float] = {}  # replica -> last 200 from /health
        self._failures: dict[str, FailureRun] = {}  # deployment -> its failures in a row
        self._http = httpx.Client(timeout=self.probe.timeout_s)
        if adopt:
            self.adopt()

    # -- public API (what the broker server hosts) --------------------------------------------

    def create(self, spec: Any, plan: Any) -> Deployment:
        """Record a deployment and its desired replicas, start its router; launches follow
        in `reconcile_once()` / `run()`. Raises StateError if the name is taken, and a
        ProvisionError (nothing written) if the provisioner cannot launch the plan here: a
        missing extra, no cloud credentials."""
        targets = targets_from_plan(plan)
        with self._lock:
            if self.store.get_deployment(spec.name) is not None:
                raise StateError(f"a deployment named {spec.name!r} exists")
            prov = self._provisioner(spec.infra)
            check = getattr(prov, "check", None)
            if check is not None:
                check({t["key"][0] for t in targets})
            dep = self.store.create_deployment(
                spec.name,
                spec.infra,
                spec=spec.model_dump(mode="json"),
                plan=plan.to_dict(),
                targets=targets,
            )
            self.store.add_event(
                dep.name, "created", f"plan: {_plan_summary(targets)}", data={"targets": targets}
            )
            dep = self._start_router(dep)
            self._fill(dep, self.store.list_replicas(dep.name))
            return dep

    def dry_run(self, spec: Any, plan: Any) -> list[dict[str, Any]]:
        """What `create` would launch, validated by the provisioner and launching nothing:
        its checks, then each placement's replica built and passed to the provisioner's
        `dry_run` (SkyPilot validates the Task) when it has one. Raises ProvisionError."""
        targets = targets_from_plan(plan)
        prov = self._provisioner(spec.infra)
        check = getattr(prov, "check", None)
        if check is not None:
            check({t["key"][0] for t in targets})
        now = time.time()
        dep = Deployment(
            name=spec.name,
            infra=spec.infra,
            status="DRY_RUN",
            spec=spec.model_dump(mode="json"),
            plan=plan.to_dict(),
            targets=targets,
            blocklist=[],
            router_host=self.router_host,
            router_port=None,
            message="",
            created_at=now,
            updated_at=now,
        )
        replicas = []
        for i, t in enumerate(targets):
            cloud, region, instance_type, spot = t["key"]
            rep = Replica(
                id=i,
                deployment=spec.name,
                name=f"{spec.name}-dry{i}",
                target=i,
                cloud=cloud,
                region=region,
                instance_type=instance_type,
                spot=bool(spot),
                status=ReplicaStatus.PENDING,
                url=None,
                handle=None,
                failures=0,
                message="",
                created_at=now,
                updated_at=now,
                launched_at=None,
                ready_at=None,
            )
            replicas.append(self._replica_spec(dep, rep))
        validate = getattr(prov, "dry_run", None)
        checked = list(self._pool.map(validate, replicas)) if validate else [{}] * len(targets)
        return [
            {**t, "validated": validate is not None, **c}
            for t, c in zip(targets, checked, strict=True)
        ]

    def list(self) -> list[Deployment]:
        return self.store.list_deployments()

    def get(self, name: str) -> Deployment | None:
        return self.store.get_deployment(name)

    def replicas(self, name: str, live_only: bool = True) -> list[Replica]:
        return self.store.list_replicas(name, live_only=live_only)

    def events(self, name: str, limit: int | None = 100) -> list[Event]:
        return self.store.list_events(name, limit=limit)

    def router(self, name: str) -> Router | None:
        return self._routers.get(name)

    def describe(self, name: str) -> dict[str, Any] | None:
        """A JSON-able status of one deployment: replicas, health, $/h, endpoint, events."""
        dep = self.get(name)
        if dep is None:
            return None
        reps = self.replicas(name)
        price = {i: t["price_per_hour"] for i, t in enumerate(dep.targets)}
        running = [r for r in reps if r.status in RUNNING_STATUSES]
        run = self._failures.get(name) or FailureRun()
        wait = run.next_launch_at - time.time()
        return {
            "name": dep.name,
            "infra": dep.infra,
            "status": dep.status,
            "message": dep.message,
            "endpoint": dep.endpoint,
            "model": dep.spec.get("model", {}).get("name") or dep.spec.get("model", {}).get("path"),
            "cost_per_hour": round(sum(price.get(r.target, 0.0) for r in running), 4),
            "planned_cost_per_hour": dep.plan.get("cost_per_hour"),
            "desired_replicas": sum(t["replicas"] for t in dep.targets),
            "ready_replicas": sum(r.status == ReplicaStatus.READY for r in reps),
            "replicas": [
                {
                    "name": r.name,
                    "cloud": r.cloud,
                    "region": r.region,
                    "instance_type": r.instance_type,
                    "spot": r.spot,
                    "status": r.status,
                    "url": r.url,
                    "price_per_hour": price.get(r.target, 0.0),
                    "message": r.message,
                }
                for r in reps
            ],
            "blocklist": [list(k) for k in dep.blocklist],
            "failures": run.count,  # in a row (see ProbeConfig)
            "next_launch_in_s": round(wait, 1) if run.count and wait > 0 else None,
            "events": [
                {"time": e.time, "kind": e.kind, "replica": e.replica, "message": e.message}
                for e in self.events(name, limit=20)
            ],
        }

    def logs(self, name: str, replica: str | int | None = None, tail: int = 200) -> str:
        """The engine log of one replica (by name, or index among live ones; default first)."""
        reps = self.replicas(name, live_only=False)
        if not reps:
            raise StateError(f"deployment {name!r} has no replicas")
        if isinstance(replica, int):
            live = [r for r in reps if r.status in RUNNING_STATUSES] or reps
            if not 0 <= replica < len(live):
                raise StateError(f"replica index {replica} out of range 0..{len(live) - 1}")
            rep = live[replica]
        elif replica is None:
            rep = next((r for r in reps if r.status in RUNNING_STATUSES), reps[-1])
        else:
            matches = [r for r in reps if r.name == replica]
            if not matches:
                raise StateError(f"deployment {name!r} has no replica {replica!r}")
            rep = matches[0]
        dep = self.store.get_deployment(name)
        assert dep is not None
        return self._provisioner(dep.infra).logs(self._handle(rep, dep.infra), tail=tail)

    def delete(self, name: str) -> bool:
        """Tear a deployment down completely; False if there was none (twice is fine)."""
        with self._lock:
            dep = self.store.get_deployment(name)
            if dep is None:
                return False
            self.store.update_deployment(name, status=DeploymentStatus.DELETING)
            self.store.add_event(name, "deleting", "tearing down all replicas")
        # Launches in flight finish first (their rows then hold handles to terminate).
        for rep_name, fut in list(self._launches.items()):
            if rep_name.startswith(f"{name}-"):
                fut.exception()
        with self._lock:
            self._collect_launches(name)
            prov = self._provisioner(dep.infra)
            for rep in self.store.list_replicas(name, live_only=False):
                if rep.status != ReplicaStatus.TERMINATED or rep.handle:
                    self._terminate(prov, rep, dep.infra, event=None)
            self._stop_router(name)
            self.store.delete_deployment(name)
            self._failures.pop(name, None)
            return True

    def reconcile_once(self) -> None:
        """One pass over every deployment (see module doc)."""
        with self._lock:
            for dep in self.store.list_deployments():
                if dep.status == DeploymentStatus.DELETING:
                    continue
                try:
                    self._reconcile(dep)
                except Exception as e:  # one deployment's trouble must not stop the others
                    log.exception("reconcile of %s failed", dep.name)
                    self.store.add_event(dep.name, "error", f"reconcile failed: {e}")

    def run(self, stop_event: threading.Event, interval_s: float = 1.0) -> None:
        """Reconcile until `stop_event` is set."""
        while not stop_event.is_set():
            self.reconcile_once()
            stop_event.wait(interval_s)

    def wait_ready(self, name: str, timeout_s: float, interval_s: float = 0.5) -> Deployment:
        """Reconcile until every desired replica of `name` is ready (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.reconcile_once()
            dep = self.get(name)
            if dep is None:
                raise StateError(f"unknown deployment {name!r}")
            if dep.status == DeploymentStatus.READY:
                return dep
            if dep.status == DeploymentStatus.FAILED:
                raise ProvisionError(f"deployment {name!r} failed: {dep.message}")
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.name}: {r.status}" for r in self.replicas(name))
                raise TimeoutError(
                    f"deployment {name!r} not ready after {timeout_s:.0f}s ({states or 'none'})"
                )
            time.sleep(interval_s)

    def close(self) -> None:
        """Stop routers and threads; replicas keep running (a new controller re-adopts them)."""
        for name in list(self._servers):
            self._stop_router(name)
        self._pool.shutdown(wait=True)
        with self._lock:  # launches that finished meanwhile: record their handles
            for dep in self.store.list_deployments():
                self._collect_launches(dep.name)
        self._http.close()

    # -- restart --------------------------------------------------------------------------------

    def adopt(self) -> None:
        """After a (re)start: keep live replicas, clean up dead or half-launched ones, serve."""
        with self._lock:
            for dep in self.store.list_deployments():
                try:
                    self._adopt(dep)
                except ProvisionError as e:  # e.g. a missing extra: keep the others going
                    log.error("cannot adopt %s: %s", dep.name, e)
                    self.store.add_event(dep.name, "error", f"cannot adopt after restart: {e}")

    def _adopt(self, dep: Deployment) -> None:
        if dep.status == DeploymentStatus.DELETING:
            self.delete(dep.name)
            return
        run = self._restore_failures(dep.name)
        if run is not None:
            self._failures[dep.name] = run
        prov = self._provisioner(dep.infra)
        for rep in self.store.list_replicas(dep.name):
            if rep.status == ReplicaStatus.PENDING:
                continue
            handle = self._handle(rep, dep.infra)
            alive = rep.status in RUNNING_STATUSES and self._state(prov, handle) in (
                ReplicaState.RUNNING,
                ReplicaState.LAUNCHING,
            )
            if alive:
                self.store.update_replica(rep.name, status=ReplicaStatus.STARTING)
                self.store.add_event(dep.name, "adopted", "replica still runs", rep.name)
            else:
                self._terminate(prov, rep, dep.infra, event="cleaned up after restart")
        self._start_router(dep)

    # -- one deployment ---------------------------------------------------------------------

    def _reconcile(self, dep: Deployment) -> None:
        self._collect_launches(dep.name)
        dep = self.store.get_deployment(dep.name) or dep
        prov = self._provisioner(dep.infra)
        for rep in self.store.list_replicas(dep.name):
            if rep.status in RUNNING_STATUSES:
                self._check(prov, dep, rep)
        dep = self.store.get_deployment(dep.name) or dep
        if dep.status != DeploymentStatus.FAILED:
            reps = self._fill(dep, self.store.list_replicas(dep.name))
            run = self._failures.get(dep.name)
            if run is None or time.time() >= run.next_launch_at:  # else: backing off
                for rep in reps:
                    if rep.status == ReplicaStatus.PENDING:
                        self._launch(prov, dep, rep)
        self._update_router(dep)
        self._update_status(dep)

    def _fill(self, dep: Deployment, reps: list[Replica]) -> list[Replica]:
        """Add PENDING rows for missing replicas, terminate ones no target wants."""
        prov = self._provisioner(dep.infra)
        for i, t in enumerate(dep.targets):
            have = [r for r in reps if r.target == i and r.offering_key == tuple(t["key"])]
            for _ in range(t["replicas"] - len(have)):
                self.store.add_replica(dep.name, i, tuple(t["key"]))
            extra = sorted(have, key=lambda r: r.status == ReplicaStatus.READY)
            for rep in extra[: max(0, len(have) - t["replicas"])]:
                self._terminate(prov, rep, dep.infra, event="scaled down")
        for rep in reps:
            t = dep.targets[rep.target] if rep.target < len(dep.targets) else None
            if t is None or tuple(t["key"]) != rep.offering_key:
                self._terminate(prov, rep, dep.infra, event="no longer in the plan")
        return self.store.list_replicas(dep.name)

    def _replica_spec(self, dep: Deployment, rep: Replica) -> ReplicaSpec:
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
        secrets_ = {k: os.environ[k] for k in SECRET_ENVS if os.environ.get(k)}
        if dep.infra != "local":  # cloud replicas are reachable from outside: require a key
            secrets_["SKYBROKER_API_KEY"] = replica_api_key(dep.name)
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
            secrets=secrets_,
        )

    def _launch(self, prov: Provisioner, dep: Deployment, rep: Replica) -> None:
        spec = self._replica_spec(dep, rep)
        self.store.update_replica(
            rep.name, status=ReplicaStatus.PROVISIONING, launched_at=time.time()
        )
        self.store.add_event(
            dep.name, "launching", f"on {_describe_key(rep.offering_key)}", rep.name
        )
        self._launches[rep.name] = self._pool.submit(prov.launch, spec)

    def _collect_launches(self, name: str) -> None:
        """Record the outcome of finished launches of deployment `name`."""
        for rep_name, fut in list(self._launches.items()):
            rep = self.store.get_replica(rep_name)
            if rep is None or rep.deployment != name:
                if rep is None and fut.done():
                    self._launches.pop(rep_name)
                continue
            if not fut.done():
                continue
            self._launches.pop(rep_name)
            dep = self.store.get_deployment(name)
            assert dep is not None
            error = fut.exception()
            if error is None:
                handle = fut.result()
                self.store.update_replica(
                    rep_name,
                    status=ReplicaStatus.STARTING,
                    handle=handle.to_dict(),
                    url=handle.url,
                    launched_at=time.time(),
                )
                self.store.add_event(name, "launched", f"engine at {handle.url}", rep_name)
            else:
                self._launch_failed(dep, rep, error)

    def _launch_failed(self, dep: Deployment, rep: Replica, error: BaseException) -> None:
        prov = self._provisioner(dep.infra)
        try:  # whatever the failed launch left (a process, an INIT cluster) goes too
            prov.terminate(ReplicaHandle(provider=prov.name, name=rep.name))
        except ProvisionError as e:
            self.store.add_event(dep.name, "cleanup_failed", str(e), rep.name)
        self.store.update_replica(rep.name, status=ReplicaStatus.FAILED, message=str(error))
        if isinstance(error, CapacityError):
            self.store.add_event(dep.name, "capacity_error", str(error), rep.name)
            self._failover(dep, error.offering_key)
            return
        self.store.add_event(dep.name, "launch_failed", str(error), rep.name)
        self._count_failure(dep, f"launch of {rep.name} failed: {error}")

    def _count_failure(self, dep: Deployment, reason: str) -> None:
        """One more failure in a row: back the next launch off, or fail the deployment."""
        current = self.store.get_deployment(dep.name)
        if current is None or current.status == DeploymentStatus.FAILED:
            return
        run = self._failures.setdefault(dep.name, FailureRun())
        now = time.time()
        run.count += 1
        run.last_at, run.last = now, reason
        if run.count >= self.probe.max_launch_failures:
            self._fail(dep, f"{run.count} failures in a row, giving up; last: {reason}")
            return
        delay = min(self.probe.backoff_max_s, self.probe.backoff_base_s * 2 ** (run.count - 1))
        run.next_launch_at = now + delay
        self.store.add_event(
            dep.name,
            "backoff",
            f"failure {run.count} of {self.probe.max_launch_failures} in a row; "
            f"next launch in {delay:.1f}s",
            data={"failures": run.count, "delay_s": delay, "reason": reason},
        )

    def _restore_failures(self, name: str) -> FailureRun | None:
        """The failures in a row a previous broker counted, from the event log: the last
        `backoff` event, unless a `recovered` one came after it. A restart neither forgets a
        crash loop nor resets its backoff."""
        for e in reversed(self.store.list_events(name, limit=500)):
            if e.kind == "recovered":
                return None
            if e.kind == "backoff":
                count = int(e.data.get("failures", 0))
                delay = float(e.data.get("delay_s", 0.0))
                reason = str(e.data.get("reason", ""))
                return FailureRun(count, e.time, e.time + delay, reason) if count else None
        return None

    def _crash_reason(self, prov: Provisioner, rep: Replica, infra: str, what: str) -> str:
        """`what`, with the replica's exit code and last log lines where the provider knows."""
        handle = self._handle(rep, infra)
        parts = [f"replica {rep.name} {what}"]
        code = getattr(prov, "exit_code", lambda _h: None)(handle)
        if code is not None:
            parts.append(f"exit code {code}" if code >= 0 else f"killed by signal {-code}")
        try:
            tail = prov.logs(handle, tail=5).strip()
        except ProvisionError:
            tail = ""
        if tail:
            parts.append("log tail: " + " | ".join(tail.splitlines())[-400:])
        return "; ".join(parts)

    def _failover(self, dep: Deployment, key: Any) -> None:
        """Blocklist the offering and re-solve the plan without it (once per offering)."""
        if tuple(key) in {tuple(k) for k in dep.blocklist}:
            return
        blocklist = {tuple(k) for k in dep.blocklist} | {tuple(key)}
        dep = self.store.update_deployment(dep.name, blocklist=sorted(blocklist))
        try:
            from skybroker.spec import DeploymentSpec

            plan = self.planner(
                DeploymentSpec.model_validate(dep.spec), blocklist=frozenset(blocklist)
            )
        except Exception as e:  # InfeasibleError: nothing left that meets the spec
            self._fail(dep, f"no feasible plan without {_describe_key(key)}: {e}")
            return
        targets = targets_from_plan(plan)
        old = _plan_summary(dep.targets)
        # Replicas keep their offering's new target index; others are terminated by _fill.
        index = {tuple(t["key"]): i for i, t in enumerate(targets)}
        for rep in self.store.list_replicas(dep.name):
            if rep.offering_key in index:
                self.store.update_replica(rep.name, target=index[rep.offering_key])
        dep = self.store.update_deployment(dep.name, plan=plan.to_dict(), targets=targets)
        self.store.add_event(
            dep.name,
            "failover",
            f"re-planned without {_describe_key(key)}: {_plan_summary(targets)} (was {old})",
            data={"blocked": list(key), "targets": targets},
        )

    def _fail(self, dep: Deployment, message: str) -> None:
        self.store.update_deployment(dep.name, status=DeploymentStatus.FAILED, message=message)
        self.store.add_event(dep.name, "failed", message)

    def _check(self, prov: Provisioner, dep: Deployment, rep: Replica) -> None:
        """Provider state, then /health: mark ready, unready, or replace."""
        state = self._state(prov, self._handle(rep, dep.infra))
        if state == ReplicaState.PREEMPTED:
            self._terminate(prov, rep, dep.infra, event="replica preempted; replacing it")
            return
        if state == ReplicaState.DEAD:
            reason = self._crash_reason(prov, rep, dep.infra, "died")
            self._terminate(prov, rep, dep.infra, event=f"{reason}; replacing it")
            self._count_failure(dep, reason)
            return
        now = time.time()
        launched = rep.launched_at or rep.created_at
        if now - launched < self.probe.initial_delay_s or not rep.url:
            return
        if self._healthy(rep.url):
            self._probed_at[rep.name] = now
            if rep.status != ReplicaStatus.READY:
                self.store.update_replica(
                    rep.name, status=ReplicaStatus.READY, ready_at=now, failures=0, message=""
                )
                self.store.add_event(dep.name, "ready", f"{rep.url}/health answers 200", rep.name)
            elif rep.failures:
                self.store.update_replica(rep.name, failures=0)
            self._maybe_recovered(dep, rep, now)
            return
        if rep.status == ReplicaStatus.STARTING:
            if now - launched > self.probe.startup_timeout_s:
                reason = self._crash_reason(prov, rep, dep.infra, "never became ready")
                self._terminate(prov, rep, dep.infra, event=f"{reason}; replacing it")
                self._count_failure(dep, reason)
            return
        failures = rep.failures + 1
        if rep.status == ReplicaStatus.READY and failures >= self.probe.failure_threshold:
            self.store.update_replica(rep.name, status=ReplicaStatus.NOT_READY, failures=failures)
            self.store.add_event(dep.name, "not_ready", f"{failures} probes failed", rep.name)
        elif (
            rep.status == ReplicaStatus.NOT_READY
            and now - self._probed_at.get(rep.name, rep.ready_at or launched)
            > self.probe.unhealthy_timeout_s
        ):
            reason = self._crash_reason(prov, rep, dep.infra, "was unhealthy too long")
            self._terminate(prov, rep, dep.infra, event=f"{reason}; replacing it")
            self._count_failure(dep, reason)
        else:
            self.store.update_replica(rep.name, failures=failures)

    def _maybe_recovered(self, dep: Deployment, rep: Replica, now: float) -> None:
        """End a run of failures once a replica launched after it has stayed ready."""
        run = self._failures.get(dep.name)
        if run is None or not run.count or rep.ready_at is None:
            return
        launched = rep.launched_at or rep.created_at
        if launched >= run.last_at and now - rep.ready_at >= self.probe.stable_s:
            self._failures.pop(dep.name)
            self.store.add_event(
                dep.name, "recovered", f"ready for {self.probe.stable_s:.0f}s", rep.name
            )

    def _healthy(self, url: str) -> bool:
        try:
            return self._http.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def _terminate(self, prov: Provisioner, rep: Replica, infra: str, event: str | None) -> None:
        self.store.update_replica(rep.name, status=ReplicaStatus.TERMINATING)
        try:
            prov.terminate(self._handle(rep, infra))
        except ProvisionError as e:
            self.store.update_replica(rep.name, message=f"terminate failed: {e}")
            self.store.add_event(rep.deployment, "terminate_failed", str(e), rep.name)
            raise
        self.store.update_replica(rep.name, status=ReplicaStatus.TERMINATED)
        self._probed_at.pop(rep.name, None)
        if event:
            self.store.add_event(rep.deployment, "terminated", event, rep.name)

    def _update_status(self, dep: Deployment) -> None:
        if dep.status == DeploymentStatus.FAILED:
            return
        reps = self.store.list_replicas(dep.name)
        desired = sum(t["replicas"] for t in dep.targets)
        ready = sum(r.status == ReplicaStatus.READY for r in reps)
        if ready >= desired and desired > 0:
            status = DeploymentStatus.READY
        elif ready:
            status = DeploymentStatus.DEGRADED
        else:
            status = DeploymentStatus.PROVISIONING
        if status != dep.status:
            self.store.update_deployment(dep.name, status=status, message="")
            self.store.add_event(dep.name, "status", f"{status}: {ready}/{desired} replicas ready")

    # -- routers ------------------------------------------------------------------------------

    def _start_router(self, dep: Deployment) -> Deployment:
        if dep.name in self._routers:
            return dep
        upstream_key = replica_api_key(dep.name) if dep.infra != "local" else None
        router = Router(dep.name, upstream_api_key=upstream_key)
        self._routers[dep.name] = router
        if not self.serve_routers:
            return dep
        port = dep.router_port or free_port(self.router_host)
        server = RouterServer(router, host=self.router_host, port=port)
        try:
            server.start()
        except RuntimeError:  # the old port is taken now: take another
            server = RouterServer(router, host=self.router_host, port=0)
            server.start()
        self._servers[dep.name] = server
        if server.port != dep.router_port or dep.router_host != self.router_host:
            dep = self.store.update_deployment(
                dep.name, router_port=server.port, router_host=self.router_host
            )
        return dep

    def _stop_router(self, name: str) -> None:
        server = self._servers.pop(name, None)
        if server is not None:
            server.stop()
        self._routers.pop(name, None)

    def _update_router(self, dep: Deployment) -> None:
        router = self._routers.get(dep.name)
        if router is None:
            return
        targets = []
        for rep in self.store.list_replicas(dep.name):
            if not rep.url or rep.status not in RUNNING_STATUSES:
                continue
            t = dep.targets[rep.target] if rep.target < len(dep.targets) else {}
            urls = (rep.handle or {}).get("info", {}).get("urls") or [rep.url]
            for i, url in enumerate(urls):
                targets.append(
                    ReplicaTarget(
                        name=rep.name if i == 0 else f"{rep.name}/{i}",
                        url=url,
                        capacity_rps=float(t.get("capacity_rps") or 1.0) / len(urls),
                        ready=rep.status == ReplicaStatus.READY,
                        probed_at=self._probed_at.get(rep.name, 0.0),
                    )
                )
        router.set_replicas(targets)

    # -- helpers ------------------------------------------------------------------------------

    def _provisioner(self, infra: str) -> Provisioner:
        if infra not in self.provisioners:
            self.provisioners[infra] = get_provisioner(infra)
        return self.provisioners[infra]

    @staticmethod
    def _handle(rep: Replica, infra: str) -> ReplicaHandle:
        if rep.handle:
            return ReplicaHandle.from_dict(rep.handle)
        return ReplicaHandle(provider=infra, name=rep.name)

    @staticmethod
    def _state(prov: Provisioner, handle: ReplicaHandle) -> ReplicaState:
        try:
            return prov.status(handle)
        except ProvisionError:
            return ReplicaState.LAUNCHING  # the provider cannot tell now: do not replace


def replica_api_key(deployment: str) -> str:
    """The API key of a deployment's cloud replicas: HMAC of the name under the broker's
    secret ($SKYBROKER_HOME/secret, mode 0600), so the store never holds it."""
    path = default_home() / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another broker wrote it first
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    key = path.read_text().strip().encode()
    return hmac.new(key, deployment.encode(), hashlib.sha256).hexdigest()
