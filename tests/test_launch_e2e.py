"""End to end on the local infra with the real engine server and a tiny random Llama.

Plan (real make_plan) -> controller -> two `python -m engine.serve` replicas -> router, driven
by the `openai` client: SIGKILL one replica and see it replaced with no request failing after
the router marked it unready; a restarted controller finds the deployment and serves it;
`down` leaves no process. Failover runs the real planner on a cloud spec with a provisioner
double whose first offering has no capacity (its replicas run the stand-in engine of
test_provision_local: the real engine's path through the controller is the first test's),
and a half-way failed launch is cleaned up.

Each real engine start imports torch (seconds, tens of seconds on a busy box), so the tests
start as few as their checks need and poll often.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("engine.llm_engine") is None:  # the engine is another branch
    pytest.skip("the engine (engine.llm_engine) is not in this tree", allow_module_level=True)

import openai
from test_provision_local import FAKE_SERVE

from skybroker.controller import Controller, ProbeConfig
from skybroker.plan import make_plan
from skybroker.provision import CapacityError, ProvisionError, ReplicaHandle, ReplicaSpec
from skybroker.provision.local import LocalProvisioner, process_start_time
from skybroker.spec import parse_spec
from skybroker.state import DeploymentStatus, ReplicaStatus, Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ENGINE = {"max_model_len": 256, "kv_cache_gib": 0.05, "max_num_seqs": 8}


def local_spec(model: Path, name: str = "e2e") -> Any:
    return parse_spec(
        {
            "name": name,
            "infra": "local",
            "model": {"path": str(model)},
            "workload": {"rate": 0.05, "input_tokens": {"mean": 16}, "output_tokens": {"mean": 8}},
            "slo": {"ttft_ms": 30000, "tpot_ms": 5000, "percentile": 90},
            "constraints": {"min_replicas": 2},
            "engine": ENGINE,
        }
    )


def cloud_spec(model: Path) -> Any:
    return parse_spec(
        {
            "name": "e2e-cloud",
            "infra": "skypilot",
            "model": {"path": str(model)},
            "workload": {"rate": 1, "input_tokens": {"mean": 16}, "output_tokens": {"mean": 8}},
            "constraints": {"clouds": ["aws", "gcp"], "regions": ["us-east-1", "us-central1"]},
            "engine": ENGINE,
        }
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class Loop:
    """The controller's run loop in a thread, as the broker server runs it."""

    def __init__(self, controller: Controller) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=controller.run, args=(self.stop, 0.1), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _all_pids(store: Store, name: str) -> list[int]:
    return [r.handle["info"]["pid"] for r in store.list_replicas(name, live_only=False) if r.handle]


def two_local_replicas(spec: Any) -> Any:
    """The real plan of a local spec with min_replicas 2: two engine processes here."""
    plan = make_plan(spec, baselines=False)
    assert [(p.key, p.replicas) for p in plan.placements] == [
        (("local", "local", "localhost", False), 2)
    ]
    return plan


def test_local_two_replicas_kill_one_restart_down(tiny_llama_dir: Path, home: Path) -> None:
    store = Store()
    spec = local_spec(tiny_llama_dir)
    plan = two_local_replicas(spec)
    probe = ProbeConfig(
        timeout_s=2, failure_threshold=1, unhealthy_timeout_s=5, backoff_base_s=0.05
    )
    c1 = Controller(store, {"local": LocalProvisioner()}, probe=probe)
    loop = Loop(c1)
    try:
        dep = c1.create(spec, plan)
        _wait(lambda: c1.get("e2e").status == DeploymentStatus.READY, 300, "two ready replicas")
        key = c1.api_key("e2e")
        client = openai.OpenAI(base_url=dep.endpoint, api_key=key, max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert chat.usage.completion_tokens == 4
        stream = client.completions.create(model=model, prompt="the cat", max_tokens=5, stream=True)
        assert len([ch for ch in stream if ch.choices and ch.choices[0].text]) >= 1

        # Steady traffic while one replica is SIGKILLed.
        results: list[tuple[float, bool, str]] = []
        stop = threading.Event()
        # Requests every 0.1 s, but every 1 s while the replacement engine starts (only the
        # survivor serves then): its start-up needs the CPU more than the test needs requests.
        gap = [0.1]

        def traffic() -> None:
            while not stop.is_set():
                t = time.time()
                try:
                    client.completions.create(model=model, prompt="the dog", max_tokens=3)
                    results.append((t, True, ""))
                except openai.OpenAIError as e:
                    results.append((t, False, repr(e)))
                stop.wait(gap[0])

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        _wait(lambda: len(results) >= 2, 60, "traffic before the kill")
        victim = c1.replicas("e2e")[0]
        os.kill(victim.handle["info"]["pid"], signal.SIGKILL)
        router = c1.router("e2e")
        _wait(
            lambda: not {r["name"]: r["ready"] for r in router.snapshot()}.get(victim.name, False),
            30,
            "the router to mark the killed replica unready",
        )
        unready_at = time.time()
        n = len(results)
        _wait(lambda: len(results) >= n + 5, 60, "traffic after the unready mark")
        gap[0] = 1.0
        _wait(
            lambda: (
                [r.status for r in c1.replicas("e2e")] == [ReplicaStatus.READY] * 2
                and victim.name not in {r.name for r in c1.replicas("e2e")}
            ),
            300,
            "a replacement replica",
        )
        gap[0] = 0.1
        n = len(results)
        _wait(lambda: len(results) >= n + 5, 60, "traffic after the replacement")
        stop.set()
        sender.join(timeout=60)
        after = [r for r in results if r[0] >= unready_at]
        assert after, "no request was sent after the replica was marked unready"
        assert all(ok for _, ok, _ in after), [r for r in after if not r[1]]
        kinds = [e.kind for e in c1.events("e2e")]
        assert "terminated" in kinds and kinds.count("ready") >= 3
    finally:
        loop.close()
        c1.close()  # the broker stops; replicas keep running

    # A restarted broker finds the deployment, re-adopts both replicas and serves again.
    c2 = Controller(store, {"local": LocalProvisioner()}, probe=probe)
    try:
        assert [d.name for d in c2.list()] == ["e2e"]
        adopted = {e.replica for e in c2.events("e2e") if e.kind == "adopted"}
        assert adopted == {r.name for r in c2.replicas("e2e")} and len(adopted) == 2
        try:
            c2.wait_ready("e2e", timeout_s=120, interval_s=0.1)
        except TimeoutError:
            events = [(e.kind, e.replica, e.message) for e in c2.events("e2e", limit=30)]
            logs = [c2.logs("e2e", r.name, tail=15) for r in c2.replicas("e2e")]
            raise AssertionError(f"events: {events}\nlogs: {logs}") from None
        client = openai.OpenAI(base_url=dep.endpoint, api_key=key, max_retries=0, timeout=60)
        out = client.completions.create(model=model, prompt="the sun", max_tokens=3)
        assert out.usage.completion_tokens == 3
        pids = _all_pids(store, "e2e")
        assert len(pids) == 3
        assert c2.delete("e2e") is True
        assert all(process_start_time(p) is None for p in pids)  # down leaves no process
        assert c2.delete("e2e") is False
    finally:
        for d in c2.list():
            c2.delete(d.name)
        c2.close()


class CloudOnThisMachine:
    """A provisioner double for infra skypilot: offerings in `no_capacity` fail with a
    CapacityError; the others run the real engine as a local process."""

    name = "skypilot"

    def __init__(self, local: LocalProvisioner) -> None:
        self.local = local
        self.no_capacity: set[tuple] = set()
        self.fail_after_start = False
        self.started: list[int] = []

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        if spec.offering_key in self.no_capacity:
            raise CapacityError(spec.offering_key, f"InsufficientInstanceCapacity: {spec.region}")
        here = dataclasses.replace(
            spec, cloud="local", region="local", instance_type="localhost", engine_args=ENGINE
        )
        handle = self.local.launch(here)
        self.started.append(handle.info["pid"])
        if self.fail_after_start:
            raise ProvisionError("the instance came up but its setup failed")
        return dataclasses.replace(handle, provider=self.name)

    def status(self, handle):
        return self.local.status(handle)

    def exit_code(self, handle):
        return self.local.exit_code(handle)

    def terminate(self, handle):
        self.local.terminate(handle)

    def endpoint(self, handle):
        return self.local.endpoint(handle)

    def logs(self, handle, tail=200):
        return self.local.logs(handle, tail)


@pytest.fixture
def stand_in_engine(tmp_path: Path) -> LocalProvisioner:
    """A local provisioner whose `engine.serve` is the stand-in (starts in a blink)."""
    root = tmp_path / "fakeroot"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "__init__.py").write_text("")
    (root / "engine" / "serve.py").write_text(FAKE_SERVE)
    env = {"CHILD_PID_FILE": os.devnull, "PYTHONPATH": str(root)}
    return LocalProvisioner(cwd=root, env=env, stop_timeout_s=5)


def test_capacity_failover_to_next_cheapest_with_real_planner(
    tiny_llama_dir, home, stand_in_engine
) -> None:
    spec = cloud_spec(tiny_llama_dir)
    plan = make_plan(spec, baselines=False)
    first = plan.placements[0].key
    expected = make_plan(spec, blocklist=frozenset({first}), baselines=False)
    cloud = CloudOnThisMachine(stand_in_engine)
    cloud.no_capacity.add(first)
    c = Controller(Store(), {"skypilot": cloud}, probe=ProbeConfig(timeout_s=2))
    try:
        c.create(spec, plan)
        c.wait_ready("e2e-cloud", timeout_s=300, interval_s=0.1)
        assert "fake engine serving" in c.logs("e2e-cloud", 0)
        keys = {r.offering_key for r in c.replicas("e2e-cloud")}
        assert keys == {p.key for p in expected.placements}
        dep = c.get("e2e-cloud")
        assert dep.blocklist == [first]
        assert dep.plan["cost_per_hour"] == pytest.approx(expected.cost_per_hour, abs=1e-3)
        events = {e.kind: e for e in c.events("e2e-cloud")}
        assert (
            "capacity_error" in events
            and "InsufficientInstanceCapacity" in events["capacity_error"].message
        )
        assert "re-planned without" in events["failover"].message
    finally:
        c.delete("e2e-cloud")
        c.close()
    assert all(process_start_time(p) is None for p in cloud.started)


def test_half_way_failure_leaves_nothing_unknown_and_down_cleans(tiny_llama_dir, home) -> None:
    spec = local_spec(tiny_llama_dir, name="e2e-half")
    spec = spec.model_copy(update={"infra": "skypilot"})
    cloud = CloudOnThisMachine(LocalProvisioner())
    cloud.fail_after_start = True
    plan = two_local_replicas(local_spec(tiny_llama_dir, name="e2e-half"))
    store = Store()
    probe = ProbeConfig(timeout_s=2, max_launch_failures=2, backoff_base_s=0.05)
    c = Controller(store, {"skypilot": cloud}, probe=probe)
    try:
        c.create(spec, plan)
        with pytest.raises(ProvisionError, match="2 failures in a row, giving up; last: launch"):
            c.wait_ready("e2e-half", timeout_s=120, interval_s=0.1)
        assert c.get("e2e-half").status == DeploymentStatus.FAILED
        rows = store.list_replicas("e2e-half", live_only=False)
        assert rows and all(r.status == ReplicaStatus.FAILED for r in rows)
        assert cloud.started and all(process_start_time(p) is None for p in cloud.started)
        assert c.delete("e2e-half") is True
    finally:
        for d in c.list():
            c.delete(d.name)
        c.close()
