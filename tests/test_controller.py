"""The controller with real local processes (a stand-in engine) and a planner double.

Replicas are real processes started by the local provisioner; the engine is a stand-in
(KEYED_SERVE: it checks the replica key like the real one, and /v1/slow takes a while; the real
engine runs in tests/test_launch_e2e.py). Routers are real router processes. The planner
double picks the cheapest offering not blocklisted, as make_plan does for these specs.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from skybroker.api import create_app
from skybroker.catalog import Offering
from skybroker.controller import Controller, ProbeConfig, replica_api_key
from skybroker.provision import (
    CapacityError,
    CredentialsError,
    MissingExtraError,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
)
from skybroker.provision.local import LocalProvisioner, process_start_time
from skybroker.spec import parse_spec
from skybroker.state import DeploymentStatus, ReplicaStatus, Store
from tests.skypilot_env import hide_skypilot

pytestmark = pytest.mark.timeout(120)

KEYED_SERVE = textwrap.dedent(
    """
    import argparse, http.server, os, time
    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--served-model-name"); p.add_argument("--host")
    p.add_argument("--port", type=int)
    a, _ = p.parse_known_args()
    KEY = os.environ.get("ENGINE_API_KEY")
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            if self.path != "/health" and self.headers.get("Authorization") != f"Bearer {KEY}":
                return self.answer(401, b"no key")
            if self.path.endswith("/slow"):
                time.sleep(2)
            body = f"{os.environ.get('OMP_NUM_THREADS')} {a.model}".encode()
            self.answer(200, body)
        def answer(self, code, body):
            self.send_response(code); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *args): pass
    print("fake engine serving", a.served_model_name, "on", a.port, flush=True)
    http.server.ThreadingHTTPServer((a.host, a.port), H).serve_forever()
    """
)

PROBE = ProbeConfig(
    timeout_s=1, unhealthy_timeout_s=2, max_launch_failures=2, backoff_base_s=0.2, stable_s=0.5
)
CRASHING_SERVE = """
import sys
print("loading model ...", flush=True)
print("RuntimeError: CUDA out of memory (fake)", flush=True)
sys.exit(3)
"""
A = Offering("aws", "us-east-1", "g5.xlarge", "A10G", 1, 24, 4, 16, 1.0, 0.4)
B = Offering("gcp", "us-central1", "g2-standard-4", "L4", 1, 24, 4, 16, 0.7, 0.3)
C = Offering("azure", "eastus", "NV36ads_A10_v5", "A10", 1, 24, 36, 440, 3.2, 1.1)


@dataclass
class FakePlacement:
    offering: Offering
    spot: bool
    replicas: int
    tensor_parallel: int = 1
    capacity_rps: float = 2.0
    price_per_hour: float = 0.0

    @property
    def key(self) -> tuple[str, str, str, bool]:
        o = self.offering
        return (o.cloud, o.region, o.instance_type, self.spot)


@dataclass
class FakePlan:
    spec: Any
    placements: list[FakePlacement]

    @property
    def cost_per_hour(self) -> float:
        return sum(p.replicas * p.price_per_hour for p in self.placements)

    def to_dict(self) -> dict[str, Any]:
        return {"cost_per_hour": self.cost_per_hour, "placements": len(self.placements)}


class Infeasible(Exception):
    pass


def planner(offerings: list[Offering], replicas: int = 2, spot: bool = False):
    def plan(spec: Any, blocklist: frozenset = frozenset(), warm: Any = None) -> FakePlan:
        for o in sorted(offerings, key=lambda o: o.price or 0):
            if (o.cloud, o.region, o.instance_type, spot) not in blocklist:
                price = o.spot_price if spot else o.price
                return FakePlan(spec, [FakePlacement(o, spot, replicas, price_per_hour=price)])
        raise Infeasible("every offering is blocklisted")

    return plan


class CloudOnThisMachine:
    """A provisioner double: 'cloud' replicas run as local processes; some offerings have no
    capacity, some launches die half-way (after the process started)."""

    name = "skypilot"

    def __init__(self, local: LocalProvisioner) -> None:
        self.local = local
        self.no_capacity: set[tuple] = set()
        self.fail_after_start = False
        self.launched: list[str] = []

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        if spec.offering_key in self.no_capacity:
            raise CapacityError(spec.offering_key, f"InsufficientInstanceCapacity in {spec.region}")
        local = dataclasses.replace(spec, cloud="local", region="local", instance_type="localhost")
        handle = self.local.launch(local)
        self.launched.append(spec.name)
        if self.fail_after_start:
            raise ProvisionError(f"setup failed on {spec.name} after the instance started")
        return dataclasses.replace(handle, provider=self.name)

    def status(self, handle):
        return self.local.status(handle)

    def exit_code(self, handle):
        return self.local.exit_code(handle)

    def terminate(self, handle):
        self.local.terminate(handle)

    def preempt(self, handle):
        self.local.preempt(handle)

    def endpoint(self, handle):
        return self.local.endpoint(handle)

    def logs(self, handle, tail=200):
        return self.local.logs(handle, tail)


@pytest.fixture
def env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    pkg = tmp_path / "fakeroot" / "engine"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "serve.py").write_text(KEYED_SERVE)
    local = LocalProvisioner(
        home=tmp_path / "home",
        cwd=tmp_path / "fakeroot",
        env={"CHILD_PID_FILE": os.devnull, "PYTHONPATH": str(tmp_path / "fakeroot")},
        stop_timeout_s=5,
    )
    cloud = CloudOnThisMachine(local)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    made: list[Controller] = []

    def controller(
        plan_offerings: list[Offering] = [A, B],  # noqa: B006
        replicas: int = 2,
        probe: ProbeConfig | None = None,
        adopt: bool = True,
        spot: bool = False,
    ) -> Controller:
        c = Controller(
            store,
            {"local": local, "skypilot": cloud},
            planner=planner(plan_offerings, replicas, spot),
            probe=probe or PROBE,
            adopt=adopt,
        )
        made.append(c)
        return c

    yield controller, cloud, store
    for c in made:
        for dep in c.list():
            c.delete(dep.name)
        c.close()
    for name in (
        os.listdir(tmp_path / "home" / "replicas")
        if (tmp_path / "home" / "replicas").exists()
        else []
    ):
        local.terminate(ReplicaHandle("local", name))


def _spec(infra: str = "skypilot", name: str = "demo"):
    return parse_spec(
        {"name": name, "infra": infra, "model": {"path": "/models/tiny"}, "workload": {"rate": 1}}
    )


def _pids(c: Controller, name: str) -> list[int]:
    return [r.handle["info"]["pid"] for r in c.replicas(name) if r.handle]


def _auth(c: Controller, name: str = "demo") -> dict[str, str]:
    return {"Authorization": f"Bearer {c.api_key(name)}"}


def _wait(cond, timeout: float = 30, c: Controller | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        if c is not None:
            c.reconcile_once()
        time.sleep(0.1)


def test_create_launch_ready_route_and_down(env) -> None:
    controller, _cloud, store = env
    c = controller()
    spec = _spec()
    dep = c.create(spec, c.planner(spec))
    assert dep.endpoint and dep.status == DeploymentStatus.PROVISIONING
    assert [r.status for r in c.replicas("demo")] == [ReplicaStatus.PENDING] * 2
    c.wait_ready("demo", timeout_s=60)
    info = c.describe("demo")
    assert info["ready_replicas"] == 2 and info["cost_per_hour"] == pytest.approx(1.4)
    assert {r["instance_type"] for r in info["replicas"]} == {"g2-standard-4"}  # cheapest
    # The router forwards to the replicas (the stand-in answers any GET) with the deployment's
    # key only, and sends the replicas their own key.
    assert httpx.get(dep.endpoint + "/models", timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer sk-" + "0" * 48}
    assert httpx.get(dep.endpoint + "/models", headers=wrong, timeout=5).status_code == 401
    r = httpx.get(dep.endpoint + "/models", headers=_auth(c), timeout=5)
    assert r.status_code == 200 and r.text.endswith("/models/tiny")
    kinds = [e.kind for e in c.events("demo")]
    assert kinds.count("launched") == 2 and kinds.count("ready") == 2
    assert "fake engine serving" in c.logs("demo", 0)
    pids = _pids(c, "demo")
    assert c.delete("demo") is True
    assert all(process_start_time(p) is None for p in pids)
    assert c.delete("demo") is False  # twice is fine
    assert store.get_deployment("demo") is None


@pytest.mark.parametrize("infra", ["skypilot", "local"])
def test_replicas_and_endpoint_get_keys_that_are_never_stored(env, infra: str) -> None:
    controller, _cloud, store = env
    c = controller([Offering("local", "local", "localhost", "cpu", 0, 0, 2, 8, 0.0, None)])
    spec = _spec(infra)
    dep = c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    reps = c.replicas("demo")
    keys = [replica_api_key(r.name, r.created_at) for r in reps]
    assert len(set(keys)) == len(reps) == 2  # a key per replica
    endpoint_key = c.api_key("demo")
    assert endpoint_key.startswith("sk-") and endpoint_key not in (*keys, c.api_key("nope"))
    rows = Path(store.url.removeprefix("sqlite:///")).read_bytes()
    assert not any(k.encode() in rows for k in (*keys, endpoint_key))
    # Each replica takes its own key only; through the router it answers.
    for rep, key, other in zip(reps, keys, keys[::-1], strict=True):
        assert httpx.get(rep.url + "/v1/models", timeout=5).status_code == 401
        assert httpx.get(rep.url + "/v1/models", headers=_bearer(other)).status_code == 401
        assert httpx.get(rep.url + "/v1/models", headers=_bearer(key)).status_code == 200
    r = httpx.get(dep.endpoint + "/models", headers=_auth(c), timeout=5)
    assert r.status_code == 200
    if infra == "local":  # each local replica runs on its share of the cores (vcpus: 2)
        assert r.text.split()[0] == "2"
    # A re-created deployment of the same name gets a new endpoint key.
    c.delete("demo")
    c.create(spec, c.planner(spec))
    assert c.api_key("demo") != endpoint_key


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_replacement_replica_gets_a_new_key(env) -> None:
    """A key seen on a replica that is gone opens none of its replacements."""
    controller, _cloud, _store = env
    c = controller(replicas=1)
    spec = _spec("skypilot")
    dep = c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    (victim,) = c.replicas("demo")
    old_key = replica_api_key(victim.name, victim.created_at)
    os.kill(victim.handle["info"]["pid"], signal.SIGKILL)
    _wait(
        lambda: (
            c.get("demo").status == DeploymentStatus.READY
            and victim.name not in [r.name for r in c.replicas("demo")]
        ),
        60,
        c,
    )
    (new,) = c.replicas("demo")
    new_key = replica_api_key(new.name, new.created_at)
    assert new_key != old_key
    assert httpx.get(new.url + "/v1/models", headers=_bearer(old_key)).status_code == 401
    assert httpx.get(new.url + "/v1/models", headers=_bearer(new_key)).status_code == 200
    # The router was handed the new key with the new replica.
    assert httpx.get(dep.endpoint + "/models", headers=_auth(c), timeout=5).status_code == 200
    assert "api_key" not in c.router("demo").snapshot()[0]


def test_sigkilled_replica_is_replaced(env) -> None:
    controller, _cloud, store = env
    c = controller()
    spec = _spec()
    c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    victim = c.replicas("demo")[0]
    os.kill(victim.handle["info"]["pid"], signal.SIGKILL)
    _wait(
        lambda: (
            c.get("demo").status == DeploymentStatus.READY
            and victim.name not in [r.name for r in c.replicas("demo")]
        ),
        60,
        c,
    )
    assert store.get_replica(victim.name).status == ReplicaStatus.TERMINATED
    assert any(e.kind == "terminated" and "died" in e.message for e in c.events("demo"))
    assert any(
        e.kind == "terminated" and "killed by signal 9" in e.message for e in c.events("demo")
    )
    assert len(c.replicas("demo")) == 2
    # One death backs off once; a replacement that stays ready ends the run of failures.
    assert [e.kind for e in c.events("demo")].count("backoff") == 1
    _wait(lambda: "recovered" in [e.kind for e in c.events("demo")], 10, c)
    assert c.describe("demo")["failures"] == 0


def test_capacity_error_fails_over_to_next_cheapest(env) -> None:
    controller, cloud, _store = env
    c = controller([A, B, C])
    cloud.no_capacity.add(("gcp", "us-central1", "g2-standard-4", False))
    spec = _spec()
    c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    reps = c.replicas("demo")
    assert {r.offering_key for r in reps} == {("aws", "us-east-1", "g5.xlarge", False)}
    dep = c.get("demo")
    assert dep.blocklist == [("gcp", "us-central1", "g2-standard-4", False)]
    failover = [e for e in c.events("demo") if e.kind == "failover"]
    assert len(failover) == 1
    assert "without gcp/us-central1/g2-standard-4" in failover[0].message
    assert "2 x aws/us-east-1/g5.xlarge ($2.00/h)" in failover[0].message


def test_no_feasible_plan_left_fails_the_deployment(env) -> None:
    controller, cloud, _store = env
    c = controller([B])
    cloud.no_capacity.add(("gcp", "us-central1", "g2-standard-4", False))
    spec = _spec()
    c.create(spec, c.planner(spec))
    with pytest.raises(ProvisionError, match="no feasible plan without gcp/us-central1"):
        c.wait_ready("demo", timeout_s=30)
    assert c.get("demo").status == DeploymentStatus.FAILED
    assert c.replicas("demo") == []


def test_half_way_failed_launch_leaves_nothing_unknown(env) -> None:
    controller, cloud, store = env
    c = controller()
    cloud.fail_after_start = True
    spec = _spec()
    c.create(spec, c.planner(spec))
    with pytest.raises(
        ProvisionError, match="2 failures in a row, giving up; last: launch of demo-"
    ):
        c.wait_ready("demo", timeout_s=30)
    # Every process the provisioner started belongs to a replica row and is gone.
    rows = {r.name: r for r in store.list_replicas("demo", live_only=False)}
    assert set(cloud.launched) <= set(rows)
    assert all(rows[n].status == ReplicaStatus.FAILED for n in cloud.launched)
    for name in cloud.launched:
        record = cloud.local.run_dir(name) / "replica.json"
        assert not record.exists()
    assert c.delete("demo") is True


def test_restarted_controller_adopts_live_and_cleans_dead(env) -> None:
    controller, _cloud, _store = env
    c1 = controller()
    spec = _spec()
    dep = c1.create(spec, c1.planner(spec))
    c1.wait_ready("demo", timeout_s=60)
    reps = c1.replicas("demo")
    router_pid = c1.router("demo").info["pid"]
    c1.close()  # the broker stops; its replicas and its router keep running
    r = httpx.get(dep.endpoint + "/models", headers=_auth(c1), timeout=5)
    assert r.status_code == 200  # the endpoint outlives the broker
    os.kill(reps[1].handle["info"]["pid"], signal.SIGKILL)  # one dies while it is down
    _wait(lambda: process_start_time(reps[1].handle["info"]["pid"]) is None, 10)
    for _ in range(4):  # the router retries on the live one what it sent to the dead one
        r = httpx.get(dep.endpoint + "/models", headers=_auth(c1), timeout=5)
        assert r.status_code == 200
    c2 = controller()
    assert c2.get("demo").endpoint == dep.endpoint  # same router port
    assert c2.router("demo").info["pid"] == router_pid  # the same router, adopted
    live = {r.name for r in c2.replicas("demo")}
    assert reps[0].name in live and reps[1].name not in live
    kinds = [(e.kind, e.replica) for e in c2.events("demo")]
    assert ("adopted", reps[0].name) in kinds
    assert ("terminated", reps[1].name) in kinds
    c2.wait_ready("demo", timeout_s=60)
    assert reps[0].name in {r.name for r in c2.replicas("demo")}
    r = httpx.get(dep.endpoint + "/models", headers=_auth(c2), timeout=5)
    assert r.status_code == 200


def test_a_dead_router_is_started_again_on_its_port(env) -> None:
    controller, _cloud, _store = env
    c = controller(replicas=1)
    spec = _spec()
    dep = c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    old = c.router("demo").info["pid"]
    os.kill(old, signal.SIGKILL)
    _wait(lambda: process_start_time(old) is None, 10)
    c.reconcile_once()
    assert c.router("demo").info["pid"] != old and c.get("demo").endpoint == dep.endpoint
    _wait(lambda: httpx.get(dep.endpoint + "/models", headers=_auth(c)).status_code == 200, 10, c)
    assert "router_restarted" in [e.kind for e in c.events("demo")]
    new = c.router("demo").info["pid"]
    c.delete("demo")
    assert process_start_time(new) is None and c.router("demo") is None


def _slow_on_each(c):
    """Two ready replicas with a slow request in flight on each: (the status codes of the
    slow requests as they finish, a function that sends one more, the threads sending the
    first two, the deployment)."""
    spec = _spec()
    dep = c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    results: list[int] = []

    def slow() -> None:
        r = httpx.get(dep.endpoint + "/slow", headers=_auth(c), timeout=30)
        results.append(r.status_code)

    senders = [threading.Thread(target=slow) for _ in range(2)]
    for t in senders:
        t.start()
    _wait(lambda: sum(r["outstanding"] for r in c.router("demo").snapshot()) == 2, 10)
    return results, slow, senders, dep


def _drain_one_of_two(c):
    """`_slow_on_each`, then a scale-down to one: (the status codes of the slow requests as
    they finish, a function that sends one more, the threads sending the first two, the
    draining replica)."""
    results, slow, senders, _ = _slow_on_each(c)
    c.scale("demo", 0, 1)
    c.reconcile_once()
    (draining,) = [r for r in c.replicas("demo") if r.status == ReplicaStatus.DRAINING]
    return results, slow, senders, draining


def test_scale_down_drains_before_stopping(env) -> None:
    """A replica the plan no longer wants gets no new request, and the one in flight on it
    finishes before it is stopped; so does `down`."""
    controller, _cloud, store = env
    c = controller(replicas=2)
    results, slow, senders, draining = _drain_one_of_two(c)
    assert {r["name"]: r["draining"] for r in c.router("demo").snapshot()}[draining.name]
    for _ in range(5):  # new requests go to the other one
        r = httpx.get(c.get("demo").endpoint + "/models", headers=_auth(c), timeout=5)
        assert r.status_code == 200
    _wait(lambda: store.get_replica(draining.name).status == ReplicaStatus.TERMINATED, 20, c)
    for t in senders:
        t.join()
    assert results == [200, 200]
    events = [(e.kind, e.replica, e.message) for e in c.events("demo")]
    assert ("draining", draining.name, "scaled down: no new requests") in events
    assert ("terminated", draining.name, "drained; scaled down") in events
    assert [r.status for r in c.replicas("demo")] == [ReplicaStatus.READY]
    # `down` drains too: the request in flight finishes.
    sender = threading.Thread(target=slow)
    sender.start()
    _wait(lambda: sum(r["outstanding"] for r in c.router("demo").snapshot()) == 1, 10)
    assert c.delete("demo") is True
    sender.join()
    assert results == [200, 200, 200]


def test_hung_replica_goes_not_ready_then_is_replaced(env) -> None:
    controller, _cloud, store = env
    c = controller()
    spec = _spec()
    c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    victim = c.replicas("demo")[0]
    os.kill(victim.handle["info"]["pid"], signal.SIGSTOP)  # alive, but /health times out
    try:
        _wait(lambda: store.get_replica(victim.name).status == ReplicaStatus.NOT_READY, 30, c)
        assert not {r["name"]: r["ready"] for r in c.router("demo").snapshot()}[victim.name]
        assert c.get("demo").status == DeploymentStatus.DEGRADED
        _wait(lambda: c.get("demo").status == DeploymentStatus.READY, 60, c)
    finally:
        if process_start_time(victim.handle["info"]["pid"]) is not None:
            os.kill(victim.handle["info"]["pid"], signal.SIGCONT)
    assert store.get_replica(victim.name).status == ReplicaStatus.TERMINATED
    assert any(e.kind == "terminated" and "unhealthy" in e.message for e in c.events("demo"))
    assert process_start_time(victim.handle["info"]["pid"]) is None


def _crash_loop(env, tmp_path: Path, probe: ProbeConfig) -> Controller:
    """A one-replica deployment whose engine exits at every start."""
    (tmp_path / "fakeroot" / "engine" / "serve.py").write_text(CRASHING_SERVE)
    c = env[0](replicas=1, probe=probe)
    spec = _spec()
    c.create(spec, c.planner(spec))
    return c


def test_crash_loop_backs_off_then_fails_with_exit_code_and_log(env, tmp_path: Path) -> None:
    """A replica that dies at every start is replaced with growing delays, and after the
    failure budget the deployment is FAILED with the exit code and log tail, launches stop."""
    probe = ProbeConfig(timeout_s=1, max_launch_failures=4, backoff_base_s=0.3, backoff_max_s=0.6)
    c = _crash_loop(env, tmp_path, probe)
    with pytest.raises(ProvisionError, match="4 failures in a row, giving up"):
        c.wait_ready("demo", timeout_s=60, interval_s=0.05)
    dep = c.get("demo")
    assert dep.status == DeploymentStatus.FAILED
    assert "exit code 3" in dep.message and "CUDA out of memory (fake)" in dep.message
    events = c.events("demo", limit=None)
    backoffs = [e for e in events if e.kind == "backoff"]
    assert [e.data["delay_s"] for e in backoffs] == [0.3, 0.6, 0.6]  # doubled, capped
    # Each replacement launch waited out its backoff after the death before it.
    launches = [e.time for e in events if e.kind == "launching"]
    assert len(launches) == 4
    for b, start in zip(backoffs, launches[1:], strict=True):
        assert start - b.time >= b.data["delay_s"] - 0.01
    failed = [e for e in events if e.kind == "failed"]
    assert len(failed) == 1 and "exit code 3" in failed[0].message
    info = c.describe("demo")
    assert info["status"] == "FAILED" and info["failures"] == 4 and "exit code 3" in info["message"]
    for _ in range(3):  # FAILED: no more launches
        c.reconcile_once()
    assert [e.kind for e in c.events("demo", limit=None)].count("launching") == 4


def test_restarted_broker_keeps_counting_a_crash_loop(env, tmp_path: Path) -> None:
    """The failure run lives in the event log: a broker restarted in the middle of a crash
    loop goes on from the count and the backoff the previous one left."""
    controller = env[0]
    probe = ProbeConfig(timeout_s=1, max_launch_failures=3, backoff_base_s=30, backoff_max_s=30)
    c1 = _crash_loop(env, tmp_path, probe)
    _wait(lambda: c1.describe("demo")["failures"] == 1, 30, c1)
    c1.close()
    c2 = controller(replicas=1, probe=dataclasses.replace(probe, backoff_base_s=0.2))
    info = c2.describe("demo")
    assert info["failures"] == 1 and info["next_launch_in_s"] > 20  # c1's 30 s backoff holds
    launches = [e.kind for e in c2.events("demo", limit=None)].count("launching")
    c2.reconcile_once()
    assert [e.kind for e in c2.events("demo", limit=None)].count("launching") == launches
    c2._failures["demo"].next_launch_at = time.time()  # skip the wait: the count is the point
    with pytest.raises(ProvisionError, match="3 failures in a row, giving up"):
        c2.wait_ready("demo", timeout_s=60, interval_s=0.05)
    assert c2.describe("demo")["failures"] == 3


def test_a_drain_that_times_out_stops_the_replica_and_its_request_goes_elsewhere(env) -> None:
    controller, _cloud, store = env
    c = controller(replicas=2, probe=dataclasses.replace(PROBE, drain_timeout_s=0.5))
    results, _, senders, draining = _drain_one_of_two(c)
    _wait(lambda: store.get_replica(draining.name).status == ReplicaStatus.TERMINATED, 10, c)
    assert ("terminated", "scaled down (drain timed out)") in [
        (e.kind, e.message) for e in c.events("demo") if e.replica == draining.name
    ]
    for t in senders:
        t.join()
    assert results == [200, 200]  # the cut-off one was sent again, to the other replica


def test_create_checks_the_provisioner_before_writing_anything(env, monkeypatch) -> None:
    controller, cloud, store = env
    c = controller()
    spec = _spec()
    plan = c.planner(spec)

    def no_credentials(clouds: set[str]) -> None:
        raise CredentialsError(f"SkyPilot cannot use {sorted(clouds)}: run `sky check gcp`")

    cloud.check = no_credentials
    with pytest.raises(CredentialsError, match="sky check gcp"):
        c.create(spec, plan)
    assert store.get_deployment("demo") is None and c.list() == [] and c.router("demo") is None
    # The real SkyPilot provisioner without SkyPilot installed: the extra is named.
    hide_skypilot(monkeypatch)
    bare = Controller(store, {}, planner=c.planner, probe=PROBE, serve_routers=False)
    try:
        with pytest.raises(MissingExtraError, match=r"pip install 'skybroker\[cloud\]'"):
            bare.create(spec, plan)
    finally:
        bare.close()
    assert store.get_deployment("demo") is None
    del cloud.check
    assert c.create(spec, plan).name == "demo"  # usable now: recorded


def test_down_cleans_a_launch_the_broker_died_in_and_twice_is_fine(env) -> None:
    """The broker dies after a replica's process started but before its handle was recorded:
    the store knows the replica by name, so `down` from a new broker kills it."""
    controller, cloud, store = env
    c1 = controller(replicas=1)
    spec = _spec()
    dep = c1.create(spec, c1.planner(spec))
    rep = c1.replicas("demo")[0]
    store.update_replica(rep.name, status=ReplicaStatus.PROVISIONING)
    handle = cloud.launch(c1._replica_spec(dep, rep))  # the launch runs; nothing is recorded
    pid = handle.info["pid"]
    assert process_start_time(pid) is not None
    c1.close()  # the broker "dies"
    c2 = controller(replicas=1, adopt=False)
    assert c2.delete("demo") is True
    assert process_start_time(pid) is None
    assert not (cloud.local.run_dir(rep.name) / "replica.json").exists()
    assert c2.delete("demo") is False
    assert store.get_deployment("demo") is None


def test_autoscaled_deployment_follows_its_load_and_says_why(env) -> None:
    controller, _cloud, _store = env
    c = controller([A], replicas=1)
    c.scaling.interval_s = 0.2
    spec = parse_spec(
        {"name": "demo", "infra": "skypilot", "model": {"path": "/models/tiny"},
         "workload": {"rate": 1},
         "autoscale": {"min_replicas": 1, "max_replicas": 3, "downscale_delay_s": 1,
                       "window_s": 2}}
    )  # fmt: skip
    c.create(spec, c.planner(spec))
    c.wait_ready("demo", timeout_s=60)
    url = c.get("demo").endpoint
    # 1 replica of capacity 2 req/s serves 1.6 within the SLO (headroom 0.2); send ~8 req/s
    with httpx.Client(headers=_auth(c), timeout=10) as http:
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            assert http.get(url.removesuffix("/v1") + "/v1/x").status_code == 200
            c.reconcile_once()
            time.sleep(0.1)
    assert c.get("demo").targets[0]["replicas"] == 3
    _wait(lambda: sum(r.status == ReplicaStatus.READY for r in c.replicas("demo")) == 3, c=c)
    # idle: down to min_replicas after the window and downscale_delay_s, by draining
    _wait(lambda: c.get("demo").targets[0]["replicas"] == 1, timeout=20, c=c)
    _wait(lambda: len(c.replicas("demo")) == 1, timeout=20, c=c)
    view = c.describe("demo")["autoscale"]
    ups = [d["reason"] for d in view["decisions"] if d["kind"] == "up"]
    downs = [d["reason"] for d in view["decisions"] if d["kind"] == "down"]
    assert ups and all(r.startswith("rate ") and "served within SLO: +" in r for r in ups)
    assert all(r.endswith(" A10G aws/us-east-1") for r in ups + downs)
    assert downs and all("within SLO: -" in r for r in downs)
    counts = [n for _, n, _ in view["history"]]
    assert counts[0] == 1 and max(counts) == 3 and counts[-1] == 1
    kinds = [e.kind for e in c.events("demo")]
    assert "draining" in kinds and "autoscaled" in kinds


def test_a_preempted_spot_replica_is_replaced_uncounted_and_no_request_is_lost(env) -> None:
    """The local provisioner's preemption hook (through the REST route) takes a spot replica
    away (marked preempted, its process killed) with a slow request in flight on it and
    requests arriving: the router sends them elsewhere, the replica is replaced, nothing
    counts as a failure."""
    controller, cloud, store = env
    c = controller([A], replicas=2, spot=True)
    results, _, senders, _ = _slow_on_each(c)
    victim = c.replicas("demo")[0]
    quick: list[int] = []
    stop = threading.Event()

    def keep_sending() -> None:
        with httpx.Client(headers=_auth(c), timeout=10) as http:
            while not stop.is_set():
                quick.append(http.get(c.get("demo").endpoint + "/models").status_code)
                time.sleep(0.02)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    api = TestClient(create_app(c, owner_key="owner-key"))
    route = f"/v1/deployments/demo/replicas/{victim.name}/preempt"
    assert api.post(route).status_code == 403  # the test hook wants the owner key
    owner = {"X-Skybroker-Owner": "owner-key"}
    assert api.post("/v1/deployments/demo/replicas/nope/preempt", headers=owner).status_code == 404
    try:
        assert api.post(route, headers=owner).status_code == 200
        assert cloud.status(c._handle(victim, "skypilot")).value == "PREEMPTED"
        _wait(
            lambda: (
                c.get("demo").status == DeploymentStatus.READY
                and victim.name not in [r.name for r in c.replicas("demo")]
            ),
            60,
            c,
        )
    finally:
        stop.set()
        sender.join()
    for t in senders:
        t.join()
    assert results == [200, 200] and quick and set(quick) == {200}
    (msg,) = [e.message for e in c.events("demo") if e.kind == "terminated"]
    assert msg.startswith(f"replica {victim.name} preempted (spot aws/us-east-1/g5.xlarge)")
    assert msg.endswith("replacing it, not counted as a failure")
    assert "backoff" not in [e.kind for e in c.events("demo")]
    assert c.describe("demo")["failures"] == 0
    assert store.get_replica(victim.name).status == ReplicaStatus.TERMINATED
    assert not (cloud.local.run_dir(victim.name) / "preempted").exists()
