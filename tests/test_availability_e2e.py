"""Traffic that survives a replica and a broker dying: the real broker server, engine and router.

A local deployment planned with `min_replicas: 2` (two engine processes of the tiny random
Llama on this machine) serves a steady, bounded stream of completions through its endpoint
(2 requests/s, each on its own connection). One replica is SIGKILLed, then the broker server
itself is SIGKILLed and started again. No request fails (those in flight on the killed replica
are retried by the router on the other one), and the endpoint never refuses a connection: it
is served by the deployment's router process, which outlives the broker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if importlib.util.find_spec("engine.llm_engine") is None:  # the engine is another branch
    pytest.skip("the engine (engine.llm_engine) is not in this tree", allow_module_level=True)

import httpx
import yaml

from skybroker import server
from skybroker.client import BrokerClient
from skybroker.keys import router_admin_key
from skybroker.provision.local import free_port, process_start_time

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RATE = 2.0  # requests/s
DURATION_S = 60.0


def _spec(model: Path) -> str:
    return yaml.safe_dump(
        {
            "name": "avail",
            "infra": "local",
            "model": {"path": str(model)},
            "workload": {"rate": 0.05, "input_tokens": 16, "output_tokens": 4},
            "slo": {"ttft_ms": 30000, "tpot_ms": 5000, "percentile": 90},
            "constraints": {"min_replicas": 2},
            "engine": {"max_model_len": 256, "kv_cache_gib": 0.05, "max_num_seqs": 8},
        }
    )


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ready(client: BrokerClient, n: int = 2) -> bool:
    d = client.get("avail")
    return d["status"] == "READY" and d["ready_replicas"] >= n


@pytest.fixture
def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(server.URL_ENV, raising=False)
    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    port = free_port()
    info, _ = server.start(port=port, timeout=120)
    yield port, info
    try:
        with BrokerClient(server.status().info.url or "", autostart=False) as c:  # type: ignore[union-attr]
            for d in c.list():
                c.delete(d["name"])
    finally:
        server.stop()


def test_replica_and_broker_killed_under_traffic_no_request_fails(
    broker, tiny_llama_dir: Path
) -> None:
    port, _info = broker
    client = BrokerClient(autostart=False, timeout=300)  # the local server: sends its owner key
    launched = client.launch(_spec(tiny_llama_dir))
    key = launched["api_key"]
    assert launched["desired_replicas"] == 2  # the planner puts both on this machine
    _wait(lambda: _ready(client), 300, "two ready replicas")
    endpoint = client.get("avail")["endpoint"]
    auth = {"Authorization": f"Bearer {key}"}
    model = httpx.get(endpoint + "/models", headers=auth, timeout=30).json()["data"][0]["id"]

    results: list[tuple[float, str]] = []  # (sent at, "ok" or what went wrong)

    def one(sent: float, tokens: int = 4) -> None:
        body = {"model": model, "prompt": "the dog", "max_tokens": tokens, "ignore_eos": True}
        try:  # a fresh connection each: a refused connection would show
            r = httpx.post(endpoint + "/completions", json=body, headers=auth, timeout=120)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens
            results.append((sent, "ok" if ok else f"HTTP {r.status_code}: {r.text[:200]}"))
        except httpx.HTTPError as e:
            results.append((sent, f"{type(e).__name__}: {e}"))

    start = time.monotonic()
    stop = threading.Event()

    def traffic(pool: ThreadPoolExecutor) -> None:
        n = 0
        while not stop.is_set() and n < RATE * DURATION_S:
            stop.wait(max(0.0, start + n / RATE - time.monotonic()))
            pool.submit(one, time.monotonic() - start)
            n += 1

    home = Path(os.environ["SKYBROKER_HOME"])
    record = home / "replicas"
    victim = sorted(p.name for p in record.iterdir())[0]
    victim_pid = json.loads((record / victim / "replica.json").read_text())["pid"]
    router_pid = json.loads((home / "routers" / "avail" / "router.json").read_text())["pid"]
    router_admin = {"Authorization": f"Bearer {router_admin_key('avail')}"}

    def in_flight() -> dict[str, int]:
        rows = httpx.get(endpoint[: -len("/v1")] + "/router/replicas", headers=router_admin)
        return {r["name"]: r["outstanding"] for r in rows.json()}

    with ThreadPoolExecutor(32) as pool:
        sender = threading.Thread(target=traffic, args=(pool,), daemon=True)
        sender.start()
        try:
            _wait(lambda: time.monotonic() - start > 10, 20, "traffic before the kills")
            for _ in range(4):  # long requests: the victim has some in flight when it dies
                pool.submit(one, time.monotonic() - start, 200)
            _wait(lambda: in_flight().get(victim, 0) >= 1, 10, "requests on the victim")
            os.kill(victim_pid, signal.SIGKILL)  # a replica dies under traffic
            _wait(lambda: time.monotonic() - start > 20, 20, "traffic after the replica died")
            broker_pid = server.status().info.pid  # type: ignore[union-attr]
            os.kill(broker_pid, signal.SIGKILL)  # and then the broker
            _wait(lambda: process_start_time(broker_pid) is None, 10, "the broker to die")
            time.sleep(3)  # the endpoint serves without any broker
            info2, started = server.start(port=port, timeout=120)
            assert started and info2.pid != broker_pid
            sender.join(timeout=DURATION_S + 30)
        finally:
            stop.set()
    assert len(results) == RATE * DURATION_S + 4
    failed = [r for r in results if r[1] != "ok"]
    assert not failed, failed
    # The restarted broker adopted the deployment, and the killed replica was replaced.
    client = BrokerClient(autostart=False, timeout=300)
    _wait(lambda: _ready(client), 300, "two ready replicas after the restart")
    d = client.get("avail", events=200)
    assert victim not in {r["name"] for r in d["replicas"]}
    kinds = [e["kind"] for e in d["events"]]
    assert "adopted" in kinds and "terminated" in kinds
    # The endpoint was the same router process all along.
    assert json.loads((home / "routers" / "avail" / "router.json").read_text())["pid"] == router_pid
    assert process_start_time(router_pid) is not None
