"""The controller against a provisioner fake that follows SkyPilot's documented states.

SkyPilot's clusters are INIT while provisioning, UP once the machine runs, STOPPED when
stopped (Azure deallocates a reclaimed spot VM), and gone from `sky.status` once terminated
(AWS and GCP delete a reclaimed spot VM). The setup and run commands are a job on an UP
cluster (PENDING, SETTING_UP, RUNNING, then SUCCEEDED, FAILED, FAILED_SETUP, FAILED_DRIVER
or CANCELLED); the cluster stays UP when its job ends. `FakeSky` keeps such clusters and
answers the provisioner contract (`skybroker.provision`: `statuses`, `failure`,
`startup_deadline_s`, `progress`) as the SkyPilot provisioner maps them. Each engine of a
cluster is a real HTTP server on loopback whose `/health` the test steers (answering,
loading, or unreachable as a cut network is: no answer within the probe's timeout). Routers
are in-process; the planner double picks the cheapest (offering, market) not blocklisted.
"""

from __future__ import annotations

import dataclasses
import http.server
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from skybroker.catalog import Offering
from skybroker.controller import Controller, ProbeConfig
from skybroker.provision import (
    CapacityError,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
)
from skybroker.spec import parse_spec
from skybroker.spot import SpotConfig, keep_on_demand, with_standby
from skybroker.state import DeploymentStatus, ReplicaStatus, StateError, Store

pytestmark = pytest.mark.timeout(60)

A = Offering("aws", "us-east-1", "g5.xlarge", "A10G", 1, 24, 4, 16, 1.0, 0.4)
B = Offering("gcp", "us-central1", "g2-standard-4", "L4", 1, 24, 4, 16, 0.7, 0.3)
ENDED = ("SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_DRIVER", "CANCELLED")


class Engine:
    """One engine's HTTP server; `mode` is what /health does: ok, loading, unreachable."""

    def __init__(self) -> None:
        self.mode = "loading"
        engine = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if engine.mode == "unreachable":
                    time.sleep(0.6)  # past the probe's timeout: as a cut network looks
                code = 200 if engine.mode == "ok" else 503
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Cluster:
    spec: ReplicaSpec
    engines: list[Engine]
    status: str = "UP"  # INIT, UP, STOPPED; a terminated cluster is removed
    job: str = "RUNNING"
    exit_code: int | None = None
    log: list[str] = field(default_factory=lambda: ["Installing skybroker ..."])


class FakeSky:
    """Clusters as SkyPilot reports them, behind the provisioner contract."""

    name = "skypilot"

    def __init__(self) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.ever_up: dict[str, bool] = {}  # name -> spot and once UP (a reclaim's sign)
        self.no_capacity: set[tuple] = set()
        self.engine_mode = "ok"  # what a new replica's engines do
        self.deadline_s = 60.0
        self.calls = {"statuses": 0, "status": 0}
        self.gate: threading.Event | None = None  # statuses() waits on it while set
        self.in_statuses = threading.Event()

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        if spec.offering_key in self.no_capacity:
            raise CapacityError(spec.offering_key, f"InsufficientInstanceCapacity {spec.region}")
        engines = [Engine() for _ in range(spec.data_parallel)]
        for e in engines:
            e.mode = self.engine_mode
        self.clusters[spec.name] = Cluster(spec, engines)
        self.ever_up[spec.name] = spec.spot
        info: dict[str, Any] = {"cluster": f"sb-{spec.name}", "job_id": 1}
        if spec.data_parallel > 1:
            info["urls"] = [e.url for e in engines]
        return ReplicaHandle(self.name, spec.name, url=engines[0].url, info=info)

    def _state(self, name: str) -> ReplicaState:
        c = self.clusters.get(name)
        if c is None:
            return ReplicaState.PREEMPTED if self.ever_up.get(name) else ReplicaState.DEAD
        if c.status == "INIT":
            return ReplicaState.LAUNCHING
        if c.status == "STOPPED":
            return ReplicaState.PREEMPTED
        return ReplicaState.FAILED if c.job in ENDED else ReplicaState.RUNNING

    def statuses(self, handles: list[ReplicaHandle]) -> dict[str, ReplicaState]:
        self.calls["statuses"] += 1
        if self.gate is not None:
            self.in_statuses.set()
            self.gate.wait(10)
        return {h.name: self._state(h.name) for h in handles}

    def status(self, handle: ReplicaHandle) -> ReplicaState:
        self.calls["status"] += 1
        return self._state(handle.name)

    def failure(self, handle: ReplicaHandle) -> str | None:
        c = self.clusters.get(handle.name)
        if c is None or c.job not in ENDED:
            return None
        return f"job 1 {c.job} (exit code {c.exit_code}); log tail: {' | '.join(c.log[-3:])}"

    def startup_deadline_s(self, spec: ReplicaSpec) -> float:
        return self.deadline_s

    def progress(self, handle: ReplicaHandle) -> str | None:
        c = self.clusters.get(handle.name)
        return None if c is None else f"{c.job}: {len(c.log)} log lines"

    def terminate(self, handle: ReplicaHandle) -> None:
        c = self.clusters.pop(handle.name, None)
        self.ever_up.pop(handle.name, None)
        for e in c.engines if c else []:
            e.close()

    def endpoint(self, handle: ReplicaHandle) -> str:
        return self.clusters[handle.name].engines[0].url

    def logs(self, handle: ReplicaHandle, tail: int = 200) -> str:
        c = self.clusters.get(handle.name)
        return "\n".join(c.log[-tail:]) if c else ""

    # what the test does to the clouds
    def reclaim(self, name: str) -> None:
        """AWS/GCP take a spot VM away: the cluster is gone from `sky.status`."""
        c = self.clusters.pop(name)
        for e in c.engines:
            e.close()

    def by_status(self, *names: str) -> list[Cluster]:
        return [self.clusters[n] for n in names]


@dataclass
class Placement:
    offering: Offering
    spot: bool
    replicas: int
    tensor_parallel: int = 1
    data_parallel: int = 1
    capacity_rps: float = 2.0

    @property
    def key(self) -> tuple[str, str, str, bool]:
        o = self.offering
        return (o.cloud, o.region, o.instance_type, self.spot)

    @property
    def price_per_hour(self) -> float:
        return (self.offering.spot_price if self.spot else self.offering.price) or 0.0


@dataclass
class Plan:
    placements: list[Placement]

    def to_dict(self) -> dict[str, Any]:
        return {"placements": len(self.placements)}


def planner(markets: list[tuple[Offering, bool]], replicas: int = 2, data_parallel: int = 1):
    def plan(spec: Any, blocklist: frozenset = frozenset(), warm: Any = None) -> Plan:
        for p in sorted(
            (Placement(o, spot, replicas, data_parallel=data_parallel) for o, spot in markets),
            key=lambda p: p.price_per_hour,
        ):
            if p.key not in blocklist:
                return Plan([p])
        raise ValueError("every offering is blocklisted")

    return plan


PROBE = ProbeConfig(
    timeout_s=0.3,
    failure_threshold=2,
    unhealthy_timeout_s=1.0,
    max_launch_failures=3,
    backoff_base_s=0.05,
    stable_s=0.2,
    network_outage_s=30.0,
    startup_stall_s=0.6,
    startup_max_factor=10.0,
    progress_every_s=0.05,
)


@pytest.fixture
def cloud(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    sky = FakeSky()
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    made: list[Controller] = []

    def controller(markets=((B, False),), replicas=2, hedge=None, dp=1, probe=PROBE, **spec):
        c = Controller(
            store,
            {"skypilot": sky},
            planner=planner(list(markets), replicas, dp),
            probe=probe,
            serve_routers=False,
            spot=hedge,
        )
        made.append(c)
        if c.get("demo") is None:
            s = parse_spec(
                {"name": "demo", "infra": "skypilot", "model": {"path": "/m"},
                 "workload": {"rate": 1}, **spec}
            )  # fmt: skip
            c.create(s, c.planner(s))
        return c

    yield controller, sky, store
    for c in made:
        c.close()
    for name in list(sky.clusters):
        sky.terminate(ReplicaHandle("skypilot", name))


def _until(cond, c: Controller, timeout: float = 15.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        c.reconcile_once()
        time.sleep(interval)


def _events(c: Controller, kind: str) -> list[str]:
    return [e.message for e in c.events("demo", limit=None) if e.kind == kind]


def _ready(c: Controller) -> bool:
    return c.get("demo").status == DeploymentStatus.READY


def test_a_failed_setup_is_replaced_at_once_with_its_reason(cloud) -> None:
    """The job ends (FAILED_SETUP), the cluster stays UP: replaced in the next pass, counted,
    with the job's state, exit code and log tail, long before any startup deadline."""
    controller, sky, _store = cloud
    sky.engine_mode = "loading"
    c = controller(replicas=1)
    _until(lambda: sky.clusters, c)
    (name,) = sky.clusters
    cluster = sky.clusters[name]
    cluster.job, cluster.exit_code = "FAILED_SETUP", 1
    cluster.log.append("ERROR: No matching distribution found for torch==9.9")
    t0 = time.monotonic()
    _until(lambda: name not in sky.clusters, c)
    assert time.monotonic() - t0 < 2
    (msg,) = [m for m in _events(c, "terminated")]
    assert msg.startswith(f"replica {name} failed: job 1 FAILED_SETUP (exit code 1)")
    assert "No matching distribution found for torch" in msg and "replacing it" in msg
    assert c.describe("demo")["failures"] == 1
    _until(lambda: len(sky.clusters) == 1, c)  # its replacement launches after the backoff


def test_startup_deadline_is_per_replica_and_extended_while_progress_changes(cloud) -> None:
    """Past its own deadline (the provisioner's `startup_deadline_s`), a loading replica whose
    progress marker changes waits on; once progress stalls for startup_stall_s it goes."""
    controller, sky, _store = cloud
    sky.engine_mode, sky.deadline_s = "loading", 0.5
    c = controller(replicas=1)
    _until(lambda: sky.clusters, c)
    (name,) = sky.clusters
    cluster = sky.clusters[name]
    t_end = time.monotonic() + 2.5  # 5x the deadline, the model still downloading
    while time.monotonic() < t_end:
        cluster.log.append("Downloading model.safetensors ...")
        c.reconcile_once()
        time.sleep(0.1)
    assert name in sky.clusters and _events(c, "terminated") == []
    (note,) = _events(c, "startup_extended")
    assert "past its 0s startup deadline but still making progress" in note.replace("1s", "0s")
    _until(lambda: name not in sky.clusters, c)  # the log stops growing: stalled
    (msg,) = _events(c, "terminated")
    assert f"replica {name} never became ready" in msg and "Downloading" in msg


def test_adoption_gives_a_fresh_startup_window(cloud) -> None:
    """A replica launched long ago and adopted by a restarted broker is not torn down by its
    first failed probe: its startup deadline counts from the adoption."""
    controller, sky, store = cloud
    sky.engine_mode, sky.deadline_s = "loading", 1.0
    c1 = controller(replicas=1)
    _until(lambda: sky.clusters, c1)
    (name,) = sky.clusters
    c1.reconcile_once()
    c1.close()
    store.update_replica(name, launched_at=time.time() - 3600)  # launched an hour ago
    c2 = controller(replicas=1)
    assert "replica still runs; a fresh probe window" in _events(c2, "adopted")
    for _ in range(5):
        c2.reconcile_once()
    assert name in sky.clusters and store.get_replica(name).status == ReplicaStatus.STARTING
    sky.clusters[name].engines[0].mode = "ok"
    _until(lambda: _ready(c2), c2)


def test_a_network_blip_replaces_nothing_on_probes_alone(cloud) -> None:
    """Every ready replica fails its probes at once: the broker's network is suspect; the
    replicas stay past unhealthy_timeout_s, one the provider reports gone is replaced, and
    when the probes answer again the rest are ready."""
    controller, sky, store = cloud
    c = controller(replicas=3)
    _until(lambda: _ready(c), c)
    names = sorted(sky.clusters)
    for cl in sky.clusters.values():
        cl.engines[0].mode = "unreachable"
    t_end = time.monotonic() + 2 * PROBE.unhealthy_timeout_s
    while time.monotonic() < t_end:
        c.reconcile_once()
    assert sorted(sky.clusters) == names and _events(c, "terminated") == []
    (msg,) = _events(c, "network_suspect")
    assert msg.startswith("3 of 3 serving replicas failed their probes at once")
    # The provider's word still counts: a cluster gone (not spot: a crash) is replaced.
    sky.terminate(ReplicaHandle("skypilot", names[0]))
    _until(lambda: store.get_replica(names[0]).status == ReplicaStatus.TERMINATED, c)
    for n in names[1:]:
        sky.clusters[n].engines[0].mode = "ok"
    _until(lambda: _ready(c), c)
    assert _events(c, "network_restored") and len(_events(c, "terminated")) == 1
    assert {names[1], names[2]} <= {r.name for r in c.replicas("demo")}


def test_a_long_outage_replaces_the_replicas_without_counting(cloud) -> None:
    controller, sky, _store = cloud
    c = controller(replicas=2, probe=dataclasses.replace(PROBE, network_outage_s=2.0))
    _until(lambda: _ready(c), c)
    old = set(sky.clusters)
    sky.engine_mode = "unreachable"  # the replacements are cut off too
    for cl in sky.clusters.values():
        cl.engines[0].mode = "unreachable"
    _until(lambda: not old & set(sky.clusters), c, timeout=20)
    msgs = _events(c, "terminated")
    assert len(msgs) == 2 and all("not counted as a failure" in m for m in msgs)
    assert all("no probe answered for" in m for m in msgs)
    assert c.describe("demo")["failures"] == 0


def test_each_engine_of_a_data_parallel_replica_is_probed(cloud) -> None:
    """One engine of two stops answering: the router sends it nothing while the other
    serves; it stays unhealthy past unhealthy_timeout_s and the replica is replaced."""
    controller, sky, _store = cloud
    c = controller(replicas=1, dp=2)
    _until(lambda: _ready(c), c)
    (name,) = sky.clusters
    sky.clusters[name].engines[1].mode = "loading"  # 503
    _until(lambda: {r["name"]: r["ready"] for r in c.router("demo").snapshot()} ==
           {name: True, f"{name}/1": False}, c)  # fmt: skip
    assert c.replicas("demo")[0].status == ReplicaStatus.READY
    _until(lambda: name not in sky.clusters, c)
    (msg,) = _events(c, "terminated")
    assert f"replica {name} engine 1 of 2 was unhealthy too long" in msg


def test_status_is_one_query_per_deployment_taken_off_the_lock(cloud) -> None:
    controller, sky, _store = cloud
    c = controller(replicas=3)
    _until(lambda: _ready(c), c)
    sky.calls = {"statuses": 0, "status": 0}
    c.reconcile_once()
    assert sky.calls == {"statuses": 1, "status": 0}
    sky.gate = threading.Event()  # the next statuses() hangs, as a slow cloud refresh does
    sky.in_statuses.clear()
    passing = threading.Thread(target=c.reconcile_once)
    passing.start()
    assert sky.in_statuses.wait(5)
    t0 = time.monotonic()
    c.scale("demo", 0, 2)  # an API call that needs the controller's lock
    assert time.monotonic() - t0 < 0.5
    sky.gate.set()
    passing.join(10)
    sky.gate = None


def test_preemptions_are_not_counted_and_repeated_ones_cool_the_offering_down(cloud) -> None:
    """Reclaimed spot replicas are replaced without counting; the second reclaim of one
    offering within the window takes it out of the plan for the cool-down (on-demand stands
    in); when the cool-down ends the plan takes spot again and, once its replicas are ready,
    the on-demand stand-ins are drained."""
    controller, sky, _store = cloud
    spot_a = ("aws", "us-east-1", "g5.xlarge", True)
    cfg = SpotConfig(reclaim_window_s=60, reclaims_to_cool=2, cooldown_s=1.5)
    c = controller(markets=[(A, True), (B, False)], replicas=2, hedge=cfg,
                   constraints={"spot": "prefer"}, spot={"fallback": "on_demand"})  # fmt: skip
    _until(lambda: _ready(c), c)
    first = sorted(sky.clusters)
    sky.reclaim(first[0])
    _until(lambda: _ready(c) and first[0] not in {r.name for r in c.replicas("demo")}, c)
    (msg,) = _events(c, "terminated")
    assert f"replica {first[0]} preempted (spot aws/us-east-1/g5.xlarge)" in msg
    assert "not counted as a failure" in msg and c.describe("demo")["failures"] == 0
    assert _events(c, "cooldown") == []
    sky.reclaim(first[1])  # the second reclaim of aws/us-east-1 spot within the window
    _until(lambda: _events(c, "cooldown"), c)
    assert "aws/us-east-1/g5.xlarge (spot) out of the plan" in _events(c, "cooldown")[0]
    assert spot_a in c.get("demo").blocklist
    assert c.describe("demo")["cooldowns"][0]["key"] == list(spot_a)
    _until(lambda: _ready(c) and {r.offering_key[3] for r in c.replicas("demo")} == {False}, c)
    # The cool-down ends: spot again; the stand-ins drain once the spot replicas are ready.
    _until(lambda: _events(c, "fallback_drained"), c, timeout=20)
    assert (
        "allowed again: re-planned 2 x aws/us-east-1/g5.xlarge (spot)"
        in (_events(c, "cooldown_ended")[0])
    )
    _until(lambda: len(c.replicas("demo")) == 2, c)
    assert _ready(c) and {r.offering_key for r in c.replicas("demo")} == {spot_a}
    assert spot_a not in c.get("demo").blocklist
    assert c.describe("demo")["failures"] == 0
    drained = [e for e in c.events("demo", limit=None) if e.kind == "terminated"][-2:]
    assert all(e.message.startswith("drained; no longer in the plan") for e in drained)


def test_a_spot_capacity_error_cools_down_and_fallback_none_keeps_off_on_demand(cloud) -> None:
    controller, sky, _store = cloud
    spot_a = ("aws", "us-east-1", "g5.xlarge", True)
    sky.no_capacity.add(spot_a)
    c = controller(markets=[(A, True), (B, False)], replicas=1,
                   hedge=SpotConfig(cooldown_s=0.8), constraints={"spot": "prefer"},
                   spot={"fallback": "none"})  # fmt: skip
    _until(lambda: _events(c, "cooldown"), c)
    assert "no spot capacity: InsufficientInstanceCapacity" in _events(c, "cooldown")[0]
    c.reconcile_once()
    assert c.get("demo").targets == [] and sky.clusters == {}  # no on-demand stand-in
    c.close()  # a restarted broker keeps the cool-down
    c = controller(markets=[(A, True), (B, False)], replicas=1)
    assert [d["key"] for d in c.describe("demo")["cooldowns"]] == [list(spot_a)]
    sky.no_capacity.clear()  # spot is back after the cool-down
    _until(lambda: _ready(c), c)
    assert {r.offering_key for r in c.replicas("demo")} == {spot_a}
    assert c.describe("demo")["failures"] == 0


def test_spot_target_shaping() -> None:
    spot = {"key": ["aws", "r", "g5", True], "replicas": 2}
    od = {"key": ["gcp", "r", "g2", False], "replicas": 3}
    other = {"key": ["azure", "r", "nv", False], "replicas": 1}
    assert keep_on_demand([dict(od, replicas=1)], [spot, od, other]) == [
        spot,
        dict(od, replicas=1),
    ]
    live = {("gcp", "r", "g2", False): 2}
    assert with_standby([od], [spot], live) == [spot, dict(od, replicas=2, standby=True)]
    assert with_standby([od], [spot], {}) == [spot]


def test_a_cool_down_with_nothing_else_feasible_waits_instead_of_failing(cloud) -> None:
    controller, sky, _store = cloud
    spot_a = ("aws", "us-east-1", "g5.xlarge", True)
    sky.no_capacity.add(spot_a)
    c = controller(markets=[(A, True)], replicas=1, hedge=SpotConfig(cooldown_s=0.8),
                   constraints={"spot": "prefer"})  # fmt: skip
    _until(lambda: _events(c, "cooldown"), c)
    assert c.get("demo").status != DeploymentStatus.FAILED
    assert any("waiting for the cool-down" in m for m in _events(c, "failover"))
    sky.no_capacity.clear()
    _until(lambda: _ready(c), c)
    assert {r.offering_key for r in c.replicas("demo")} == {spot_a}


def test_preempting_on_request_needs_the_provisioner_hook(cloud) -> None:
    controller, sky, _store = cloud
    c = controller(replicas=1)
    _until(lambda: _ready(c), c)
    (name,) = sky.clusters
    with pytest.raises(ProvisionError, match="'skypilot' cannot preempt on request"):
        c.preempt("demo", name)
    with pytest.raises(StateError, match="no running replica 'demo-99'"):
        c.preempt("demo", "demo-99")
