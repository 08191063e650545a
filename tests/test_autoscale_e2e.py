"""A local deployment that follows its load: the real broker server, engines and router.

The tiny random Llama with `autoscale: {min_replicas: 1, max_replicas: 3}` and
`engine.max_num_seqs: 2` (each replica decodes two sequences at a time, so a few concurrent
clients make a queue on its engine, and its planned capacity is small). A bounded, closed-loop
load ramps from one client to twelve and back to one. The controller reads the router's rate
and each replica's queue (its /metrics, through the router) and scales up when the rate
exceeds the planned capacity or the queue does not shrink, then, with the load back at one
client and the queues empty, scales down after `downscale_delay_s`. Replicas
go 1 -> 3 -> 1, no request fails (the drained replicas finish what they hold), and the
`autoscaled` events say why.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

if importlib.util.find_spec("engine.llm_engine") is None:  # the engine is another branch
    pytest.skip("the engine (engine.llm_engine) is not in this tree", allow_module_level=True)

import httpx
import yaml

from skybroker import server
from skybroker.client import BrokerClient
from skybroker.provision.local import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MEASURED = re.compile(
    r"rate [\d.]+ req/s > [\d.]+ served within SLO: \+\d |"
    r"\d+ requests queued on \d+ replicas, not shrinking: \+1 "
)
PEAK_CLIENTS = 12
TOKENS = 24  # per request (ignore_eos): each holds its engine's batch slot a while


def _spec(model: Path) -> str:
    return yaml.safe_dump(
        {
            "name": "scale",
            "infra": "local",
            "model": {"path": str(model)},
            "workload": {"rate": 0.05, "input_tokens": 16, "output_tokens": TOKENS},
            "slo": {"ttft_ms": 30000, "tpot_ms": 5000, "percentile": 90},
            "constraints": {"max_local_replicas": 3},
            "autoscale": {"min_replicas": 1, "max_replicas": 3, "downscale_delay_s": 10,
                          "window_s": 10},
            "engine": {"max_model_len": 256, "kv_cache_gib": 0.05, "max_num_seqs": 2},
        }
    )  # fmt: skip


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(server.URL_ENV, raising=False)
    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    server.start(port=free_port(), timeout=120)
    yield
    try:
        with BrokerClient(server.status().info.url or "", autostart=False) as c:  # type: ignore[union-attr]
            for d in c.list():
                c.delete(d["name"])
    finally:
        server.stop()


def test_replicas_follow_a_load_up_to_three_and_back_to_one(broker, tiny_llama_dir: Path) -> None:
    client = BrokerClient(autostart=False, timeout=300)
    launched = client.launch(_spec(tiny_llama_dir))
    assert launched["desired_replicas"] == 1
    _wait(lambda: client.get("scale")["ready_replicas"] == 1, 300, "one ready replica")
    endpoint = client.get("scale")["endpoint"]
    auth = {"Authorization": f"Bearer {launched['api_key']}"}
    model = httpx.get(endpoint + "/models", headers=auth, timeout=30).json()["data"][0]["id"]

    results: list[str] = []  # "ok" or what went wrong, one per request
    clients = [0]  # how many closed-loop clients should run now
    stop = threading.Event()

    def loop(i: int) -> None:
        body = {"model": model, "prompt": "the dog", "max_tokens": TOKENS, "ignore_eos": True}
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                if i >= clients[0]:
                    stop.wait(0.2)
                    continue
                try:
                    r = http.post(endpoint + "/completions", json=body, headers=auth)
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == TOKENS
                    results.append("ok" if ok else f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    results.append(f"{type(e).__name__}: {e}")

    seen: list[tuple[int, int]] = []  # (desired, ready) whenever it changed

    def replicas() -> tuple[int, int]:
        d = client.get("scale")
        now = (d["desired_replicas"], d["ready_replicas"])
        if not seen or seen[-1] != now:
            seen.append(now)
        return now

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(PEAK_CLIENTS)]
    for t in threads:
        t.start()
    try:
        clients[0] = 1
        time.sleep(5)
        assert replicas() == (1, 1)  # one client: no queue, nothing to do
        for n in range(2, PEAK_CLIENTS + 1):  # the ramp up
            clients[0] = n
            time.sleep(0.5)
        _wait(lambda: replicas() == (3, 3), 300, "three ready replicas")
        time.sleep(5)
        clients[0] = 1  # the ramp down
        _wait(lambda: replicas() == (1, 1), 180, "one replica again")
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=130)
    assert len(results) > 50
    failed = [r for r in results if r != "ok"]
    assert not failed, failed[:5]
    assert max(d for d, _ in seen) == 3  # never beyond max_replicas
    events = client.get("scale", events=500)["events"]
    decisions = [e["message"] for e in events if e["kind"] == "autoscaled"]
    ups = [m for m in decisions if ": +" in m]
    downs = [m for m in decisions if m.count("-") and "within SLO" in m]
    # each step up names what the router or the engines measured: the rate over the
    # planned capacity, or a queue that did not shrink
    assert ups and all(MEASURED.match(m) for m in ups), decisions
    assert downs and downs[-1].startswith("rate "), decisions
