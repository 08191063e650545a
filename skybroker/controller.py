"""The controller: keeps each deployment's replicas as its plan says, and routes to them.

Desired state is the plan's placements ("targets": offering, replicas, tensor parallel,
planned capacity); actual state is the store's replica rows plus what provisioners and
`/health` probes report. `reconcile_once()` closes the gap, one deployment at a time: it
observes the running replicas off the lock (one `statuses()` query, a probe per engine),
then under it judges each (`skybroker.supervisor` and `skybroker.verdict`: why a replica is
marked ready or replaced, and whether that counts toward the crash-loop backoff of
`skybroker.health`), launches missing replicas (in worker threads, so probing goes on),
drains replicas the plan no longer wants before it stops them (`skybroker.draining`), and
on a CapacityError blocklists the offering and re-solves the plan without it (failover; for
spot, a cool-down: `skybroker.spot`), recording events.

A replica row exists before its launch starts and names everything the provisioner creates,
so a launch that fails half-way (or a broker that dies mid-launch) leaves nothing running the
store does not know about. A restarted controller re-adopts live replicas (each with a fresh
probe window) and cleans up the rest. Deployments with `autoscale:` follow their load
(`skybroker.scaling`: the router's load in, the `skybroker.autoscale` policy's decision out,
applied through `scale`; every decision an `autoscaled` event with its reason). One router
per deployment serves its OpenAI endpoint, as a process of its own (`skybroker.routers`)
that outlives the broker; its key is `api_key(name)`. Every replica gets an API key of its
own (`skybroker.keys`), passed in its environment, never stored; the probe
reaches a replica that serves HTTPS over its pinned certificate (`replica_auth`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from skybroker.draining import Drains
from skybroker.dry_run import dry_run
from skybroker.health import FailureRun, Failures, ProbeConfig
from skybroker.keys import endpoint_api_key, replica_api_key
from skybroker.observe import handle_of, states
from skybroker.provision import (
    CapacityError,
    Provisioner,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    get_provisioner,
    sweep_unknown,
)
from skybroker.replica_auth import ReplicaClients
from skybroker.router import Router
from skybroker.routers import (
    DeploymentRouters,
    RouterProcess,
    RouterProcessError,
    replica_targets,
)
from skybroker.scaling import Scaling, scaling_view
from skybroker.spot import SpotConfig, SpotHedge
from skybroker.state import (
    Deployment,
    DeploymentStatus,
    Event,
    Replica,
    ReplicaStatus,
    StateError,
    Store,
)
from skybroker.supervisor import RUNNING_STATUSES, Supervisor
from skybroker.targets import (
    Planner,
    default_planner,
    describe_key,
    plan_summary,
    replan,
    replica_spec,
    targets_from_plan,
)
from skybroker.verdict import Observation
from skybroker.views import deployment_view

log = logging.getLogger(__name__)

__all__ = ["Controller", "FailureRun", "ProbeConfig", "replica_api_key", "targets_from_plan"]


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
        scale_interval_s: float = 5.0,
        spot: SpotConfig | None = None,
    ) -> None:
        self.store = store
        self.provisioners: dict[str, Provisioner] = dict(provisioners or {})
        self.planner = planner or default_planner
        self.probe = probe or ProbeConfig()
        self.routers = DeploymentRouters(store, router_host, serve_routers)
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_parallel_launches, thread_name_prefix="launch")
        self._pass = threading.Lock()  # one reconcile pass at a time; API calls need _lock only
        self._launches: dict[str, Future[ReplicaHandle]] = {}
        self.failures = Failures(store, self.probe)
        self._failures = self.failures.runs  # deployment -> its failures in a row
        self._replica_http = ReplicaClients(self.probe.timeout_s)
        self.scaling = Scaling(self, scale_interval_s)
        self.spot = SpotHedge(store, self.planner, spot, self.scaling.sizing)
        self.health = Supervisor(self)
        self.drains = Drains(self)
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
                dep.name, "created", f"plan: {plan_summary(targets)}", data={"targets": targets}
            )
            try:
                dep = self._start_router(dep)
            except ProvisionError:
                self.store.delete_deployment(dep.name)
                raise
            self._fill(dep, self.store.list_replicas(dep.name))
            return dep

    def scale(self, name: str, target: int, replicas: int) -> Deployment:
        """Set how many replicas one of the plan's targets wants (an autoscaler's lever); the
        next reconcile launches the missing ones or drains the extra ones."""
        with self._lock:
            dep = self.store.get_deployment(name)
            if dep is None:
                raise StateError(f"unknown deployment {name!r}")
            if not 0 <= target < len(dep.targets) or replicas < 0:
                raise StateError(f"target {target} of {len(dep.targets)}, replicas {replicas}")
            targets = [dict(t) for t in dep.targets]
            old, targets[target]["replicas"] = targets[target]["replicas"], replicas
            self.store.add_event(name, "scaled", f"target {target}: {old} -> {replicas} replicas")
            return self.store.update_deployment(name, targets=targets)

    def dry_run(self, spec: Any, plan: Any) -> list[dict[str, Any]]:
        """What `create` would launch, validated by the provisioner, launching nothing
        (`skybroker.dry_run`). Raises ProvisionError."""
        prov = self._provisioner(spec.infra)
        return dry_run(prov, spec, plan, self.routers.host, self._pool)

    def list(self) -> list[Deployment]:
        return self.store.list_deployments()

    def get(self, name: str) -> Deployment | None:
        return self.store.get_deployment(name)

    def replicas(self, name: str, live_only: bool = True) -> list[Replica]:
        return self.store.list_replicas(name, live_only=live_only)

    def events(self, name: str, limit: int | None = 100) -> list[Event]:
        return self.store.list_events(name, limit=limit)

    def router(self, name: str) -> Router | RouterProcess | None:
        """The deployment's router (`set_replicas`, `snapshot`): its process, or in-process
        with serve_routers=False."""
        return self.routers.get(name)

    def api_key(self, name: str) -> str | None:
        """The key clients of `name`'s endpoint send (None: no such deployment)."""
        dep = self.get(name)
        return None if dep is None else endpoint_api_key(dep.name, dep.created_at)

    def describe(self, name: str) -> dict[str, Any] | None:
        """A JSON-able status of one deployment: replicas, health, $/h, endpoint, events."""
        dep = self.get(name)
        if dep is None:
            return None
        events = self.events(name, limit=20)
        view = deployment_view(dep, self.replicas(name), events, self.failures.get(name))
        if dep.spec.get("autoscale"):
            view["autoscale"] = scaling_view(self.events(name, limit=1000))
        view["cooldowns"] = [
            {"key": list(k), "until": until} for k, until in self.spot.cooling(name).items()
        ]
        view["network_suspect_since"] = self.health.suspect.get(name)
        return view

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

    def preempt(self, name: str, replica: str) -> None:
        """Take a replica away as a spot reclaim does, through the provisioner's `preempt`
        hook (the local provisioner's: for tests and demos); the next pass replaces it.
        Raises StateError (no such replica) or ProvisionError (no hook on this infra)."""
        dep = self.get(name)
        if dep is None:
            raise StateError(f"unknown deployment {name!r}")
        rep = next((r for r in self.replicas(name) if r.name == replica), None)
        if rep is None or rep.status not in RUNNING_STATUSES:
            raise StateError(f"deployment {name!r} has no running replica {replica!r}")
        hook = getattr(self._provisioner(dep.infra), "preempt", None)
        if hook is None:
            raise ProvisionError(f"infra {dep.infra!r} cannot preempt on request (local can)")
        hook(self._handle(rep, dep.infra))
        self.store.add_event(name, "preempt_requested", "taken away as a reclaim would", replica)

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
            self.drains.all(dep)
            prov = self._provisioner(dep.infra)
            for rep in self.store.list_replicas(name, live_only=False):
                if rep.status != ReplicaStatus.TERMINATED or rep.handle:
                    self._terminate(prov, rep, dep.infra, event=None)
            self._stop_router(name)
            self.store.delete_deployment(name)
            self._failures.pop(name, None)
            self.scaling.forget(name)
            self.spot.forget(name)
            self.health.suspect.pop(name, None)
            return True

    def reconcile_once(self) -> None:
        """One pass over every deployment (see module doc): each is observed off the lock
        (provider states, probes), then reconciled under it."""
        with self._pass:
            for dep in self.store.list_deployments():
                if dep.status == DeploymentStatus.DELETING:
                    continue
                try:
                    seen = self.health.observe(dep)
                    with self._lock:
                        self._reconcile(dep, seen)
                except Exception as e:  # one deployment's trouble must not stop the others
                    if self.store.get_deployment(dep.name) is None:
                        continue  # deleted meanwhile
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
        """Stop threads; replicas and router processes keep running (a new controller
        re-adopts them), so the endpoints keep serving meanwhile."""
        self.routers.close()
        self._pool.shutdown(wait=True)
        self.health.close()
        with self._lock:  # launches that finished meanwhile: record their handles
            for dep in self.store.list_deployments():
                self._collect_launches(dep.name)
        self._replica_http.close()

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
            sweep_unknown(self.provisioners.values(), self.store)

    def _adopt(self, dep: Deployment) -> None:
        if dep.status == DeploymentStatus.DELETING:
            self.delete(dep.name)
            return
        self.failures.restore(dep.name)
        self.spot.restore(dep)
        prov = self._provisioner(dep.infra)
        reps = self.store.list_replicas(dep.name)
        running = [r for r in reps if r.status in RUNNING_STATUSES]
        state = states(prov, [handle_of(r, dep.infra) for r in running])
        for rep in reps:
            if rep.status == ReplicaStatus.PENDING:
                continue
            if rep.status == ReplicaStatus.DRAINING:  # drains on, from now
                self.drains.adopted(rep.name)
                continue
            alive = state.get(rep.name) in (ReplicaState.RUNNING, ReplicaState.LAUNCHING)
            if alive:  # a ready one stays in the router's set until a probe says otherwise
                if rep.status != ReplicaStatus.READY:
                    self.store.update_replica(rep.name, status=ReplicaStatus.STARTING)
                self.health.restart_clock(dep, rep)
                self.store.add_event(
                    dep.name, "adopted", "replica still runs; a fresh probe window", rep.name
                )
            else:
                self._terminate(prov, rep, dep.infra, event="cleaned up after restart")
        self._start_router(dep)

    # -- one deployment ---------------------------------------------------------------------

    def _reconcile(self, dep: Deployment, seen: dict[str, Observation]) -> None:
        self._collect_launches(dep.name)
        current = self.store.get_deployment(dep.name)
        if current is None or current.status == DeploymentStatus.DELETING:
            return
        dep = current
        if dep.name not in self.routers:  # its adoption failed: try again
            dep = self._start_router(dep)
        prov = self._provisioner(dep.infra)
        self.health.check(prov, dep, seen)
        for rep in self.store.list_replicas(dep.name):
            if rep.status == ReplicaStatus.DRAINING:
                self.drains.check(prov, dep, rep)
        dep = self.store.get_deployment(dep.name) or dep
        if dep.status != DeploymentStatus.FAILED:
            self.spot.tick(dep)
            dep = self.store.get_deployment(dep.name) or dep
            self.scaling.tick(dep)
            dep = self.store.get_deployment(dep.name) or dep
            reps = self._fill(dep, self.store.list_replicas(dep.name))
            if self.failures.may_launch(dep.name):  # else: backing off
                for rep in reps:
                    if rep.status == ReplicaStatus.PENDING:
                        self._launch(prov, dep, rep)
        self._update_router(dep)
        self._update_status(dep)

    def _fill(self, dep: Deployment, reps: list[Replica]) -> list[Replica]:
        """Add PENDING rows for missing replicas, drain (then stop) ones no target wants."""
        reps = [r for r in reps if r.status != ReplicaStatus.DRAINING]
        for i, t in enumerate(dep.targets):
            have = [r for r in reps if r.target == i and r.offering_key == tuple(t["key"])]
            for _ in range(0 if t.get("standby") else t["replicas"] - len(have)):
                self.store.add_replica(dep.name, i, tuple(t["key"]))
            extra = sorted(have, key=lambda r: r.status == ReplicaStatus.READY)
            for rep in extra[: max(0, len(have) - t["replicas"])]:
                self.drains.retire(dep, rep, "scaled down")
        for rep in reps:
            t = dep.targets[rep.target] if rep.target < len(dep.targets) else None
            if t is None or tuple(t["key"]) != rep.offering_key:
                self.drains.retire(dep, rep, "no longer in the plan")
        return self.store.list_replicas(dep.name)

    def _replica_spec(self, dep: Deployment, rep: Replica) -> ReplicaSpec:
        return replica_spec(dep, rep)

    def _launch(self, prov: Provisioner, dep: Deployment, rep: Replica) -> None:
        spec = self._replica_spec(dep, rep)
        self.store.update_replica(
            rep.name, status=ReplicaStatus.PROVISIONING, launched_at=time.time()
        )
        self.store.add_event(
            dep.name, "launching", f"on {describe_key(rep.offering_key)}", rep.name
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
                self.health.restart_clock(dep, rep)
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
            key = tuple(error.offering_key)
            if key[3]:  # spot: out of the plan for a cool-down, not for good
                self.spot.cool_down(dep, key, f"no spot capacity: {error}")
            else:
                self._failover(dep, key)
            return
        self.store.add_event(dep.name, "launch_failed", str(error), rep.name)
        self._count_failure(dep, f"launch of {rep.name} failed: {error}")

    def _count_failure(self, dep: Deployment, reason: str) -> None:
        """One more failure in a row: back the next launch off, or fail the deployment."""
        current = self.store.get_deployment(dep.name)
        if current is None or current.status == DeploymentStatus.FAILED:
            return
        give_up = self.failures.count(dep.name, reason)
        if give_up is not None:
            self._fail(dep, give_up)

    def _failover(self, dep: Deployment, key: Any) -> None:
        """Blocklist the offering and re-solve the plan without it (once per offering)."""
        give_up = replan(self.store, self.planner, dep, key, load=self.scaling.sizing(dep))
        if give_up is not None:
            self._fail(dep, give_up)

    def _fail(self, dep: Deployment, message: str) -> None:
        self.store.update_deployment(dep.name, status=DeploymentStatus.FAILED, message=message)
        self.store.add_event(dep.name, "failed", message)

    def _healthy(self, rep: Replica, url: str | None = None) -> bool:
        """/health of `rep` (or of its engine at `url`), its certificate pinned for HTTPS."""
        try:
            return self._replica_http.get(rep).get((url or rep.url) + "/health").status_code == 200
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
        self.health.forget(rep.name)
        self._replica_http.forget(rep.name)
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
        try:
            return self.routers.start(dep)
        except RouterProcessError as e:
            raise ProvisionError(str(e)) from None

    def _stop_router(self, name: str) -> None:
        self.routers.stop(name)

    def _update_router(self, dep: Deployment) -> None:
        reps = self.store.list_replicas(dep.name)
        targets = replica_targets(dep, reps, self.health.probed_at, self.health.down())
        self.routers.push(dep, targets)

    # -- helpers ------------------------------------------------------------------------------

    def _provisioner(self, infra: str) -> Provisioner:
        if infra not in self.provisioners:
            self.provisioners[infra] = get_provisioner(infra)
        return self.provisioners[infra]

    @staticmethod
    def _handle(rep: Replica, infra: str) -> ReplicaHandle:
        return handle_of(rep, infra)
