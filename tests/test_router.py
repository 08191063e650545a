"""The router against small real OpenAI-style upstream servers (FastAPI under uvicorn).

The upstreams are test doubles of the engine server's HTTP surface (the end-to-end tests use
the real engine); the `openai` package is the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.server.metrics import EngineStats, ServerMetrics
from skybroker.provision.local import free_port
from skybroker.router import ReplicaTarget, Router, RouterServer
from skybroker.router_load import engine_gauges

pytestmark = pytest.mark.timeout(60)


def upstream_app(name: str, served: Counter, delay_s: float = 0.0, status: int = 200) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({}, status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if status != 200:
            return JSONResponse({"error": {"message": "loading"}}, status)
        served[name] += 1
        served["auth:" + request.headers.get("authorization", "")] += 1
        await asyncio.sleep(delay_s)
        if body.get("stream"):

            async def events():
                for i in range(3):
                    chunk = {
                        "id": "c1",
                        "object": "text_completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "text": f"{name}-{i} ", "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.01)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {
            "id": "c1",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "text": name, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


@pytest.fixture
def servers():
    started: list[RouterServer] = []

    def serve(app: FastAPI) -> str:
        # RouterServer runs any ASGI app with a `.app`; reuse it for the upstream doubles.
        holder = type("Holder", (), {"app": app, "name": "upstream"})()
        srv = RouterServer(holder, port=0)  # type: ignore[arg-type]
        srv.start()
        started.append(srv)
        return srv.url

    yield serve
    for s in started:
        s.stop()


@pytest.fixture
def router_server():
    made: list[RouterServer] = []

    def make(**kwargs) -> tuple[Router, RouterServer]:
        router = Router("demo", **kwargs)
        srv = RouterServer(router, port=0)
        srv.start()
        made.append(srv)
        return router, srv

    yield make
    for s in made:
        s.stop()


def _client(srv: RouterServer, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_openai_client_through_router_plain_and_streaming(servers, router_server) -> None:
    served: Counter = Counter()
    a = servers(upstream_app("a", served))
    router, srv = router_server()
    router.set_replicas([ReplicaTarget("r1", a, 1.0, ready=True, probed_at=time.time())])
    client = _client(srv)
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert out.choices[0].text == "a"
    chunks = [
        c.choices[0].text for c in client.completions.create(model="tiny", prompt="hi", stream=True)
    ]
    assert chunks == ["a-0 ", "a-1 ", "a-2 "]
    assert httpx.get(srv.url + "/health").json() == {"deployment": "demo", "ready_replicas": 1}


def test_never_sends_to_a_replica_that_is_not_ready(servers, router_server) -> None:
    served: Counter = Counter()
    a, b = servers(upstream_app("a", served)), servers(upstream_app("b", served))
    router, srv = router_server()
    router.set_replicas(
        [ReplicaTarget("r1", a, 1.0, ready=True), ReplicaTarget("r2", b, 1.0, ready=False)]
    )
    client = _client(srv)
    for _ in range(6):
        client.completions.create(model="tiny", prompt="x")
    assert served["a"] == 6 and served["b"] == 0


def test_no_ready_replica_is_a_clear_503(router_server) -> None:
    _, srv = router_server()
    r = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 503
    assert "has no ready replica" in r.json()["error"]["message"]
    assert httpx.get(srv.url + "/health").status_code == 503


def test_connection_failure_retries_elsewhere_and_marks_unready_until_newer_probe(
    servers, router_server
) -> None:
    served: Counter = Counter()
    good = servers(upstream_app("good", served))
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    router, srv = router_server()
    t0 = time.time()
    # The dead one has the larger capacity, so it is picked first.
    targets = [
        ReplicaTarget("dead", dead, 10.0, True, t0),
        ReplicaTarget("good", good, 1.0, True, t0),
    ]
    router.set_replicas(targets)
    client = _client(srv)
    for _ in range(4):
        assert client.completions.create(model="tiny", prompt="x").choices[0].text == "good"
    assert served["good"] == 4
    state = {r["name"]: r["ready"] for r in router.snapshot()}
    assert state == {"dead": False, "good": True}
    router.set_replicas(targets)  # a probe result older than the failure: still unready
    assert {r["name"]: r["ready"] for r in router.snapshot()}["dead"] is False
    fresh = [ReplicaTarget("dead", dead, 10.0, True, time.time() + 1), targets[1]]
    router.set_replicas(fresh)  # a newer successful probe clears it
    assert {r["name"]: r["ready"] for r in router.snapshot()}["dead"] is True


def test_upstream_503_is_retried_on_another_replica(servers, router_server) -> None:
    served: Counter = Counter()
    loading = servers(upstream_app("loading", served, status=503))
    ok = servers(upstream_app("ok", served))
    router, srv = router_server()
    router.set_replicas([ReplicaTarget("l", loading, 5.0, True), ReplicaTarget("o", ok, 1.0, True)])
    for _ in range(3):
        assert _client(srv).completions.create(model="m", prompt="x").choices[0].text == "ok"
    router.set_replicas([ReplicaTarget("l", loading, 5.0, True)])
    r = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["message"] == "loading"


def test_least_outstanding_weighted_by_capacity(servers, router_server) -> None:
    served: Counter = Counter()
    big = servers(upstream_app("big", served, delay_s=0.5))
    small = servers(upstream_app("small", served, delay_s=0.5))
    router, srv = router_server()
    router.set_replicas(
        [ReplicaTarget("big", big, 3.0, True), ReplicaTarget("small", small, 1.0, True)]
    )

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=20) as c:
            reqs = [
                c.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "x"})
                for _ in range(8)
            ]
            for r in await asyncio.gather(*reqs):
                assert r.status_code == 200

    asyncio.run(burst())
    # 8 concurrent requests, capacities 3:1 -> 6 on big, 2 on small.
    assert (served["big"], served["small"]) == (6, 2)
    assert all(r["outstanding"] == 0 for r in router.snapshot())


def test_api_keys_client_side_and_upstream_side(servers, router_server) -> None:
    served: Counter = Counter()
    a, b = servers(upstream_app("a", served)), servers(upstream_app("b", served))
    router, srv = router_server(api_key="client-key")
    router.set_replicas(
        [
            ReplicaTarget("r1", a, 1.0, True, api_key="key-of-r1"),
            ReplicaTarget("r2", b, 1.0, True, api_key="key-of-r2"),
        ]
    )
    with pytest.raises(openai.AuthenticationError):
        _client(srv, "wrong").completions.create(model="m", prompt="x")
    for _ in range(4):
        _client(srv, "client-key").completions.create(model="m", prompt="x")
    # Each replica gets its own key, never the client's.
    assert served["a"] == served["b"] == 2
    assert served["auth:Bearer key-of-r1"] == served["auth:Bearer key-of-r2"] == 2
    assert all("api_key" not in r for r in router.snapshot())


def test_keys_are_compared_whole_and_admin_routes_need_the_admin_key(
    servers, router_server
) -> None:
    served: Counter = Counter()
    a = servers(upstream_app("a", served))
    _, srv = router_server(api_key="client-key", admin_key="admin-key")
    for key in ("client-ke", "client-key2", "CLIENT-KEY", "admin-key"):
        r = httpx.post(
            srv.url + "/v1/completions",
            json={"model": "m", "prompt": "x"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 401, key
    body = [{"name": "r1", "url": a, "capacity_rps": 1.0, "ready": True}]
    for headers in ({}, {"Authorization": "Bearer client-key"}):
        assert (
            httpx.put(srv.url + "/router/replicas", json=body, headers=headers).status_code == 401
        )
        assert httpx.get(srv.url + "/router/replicas", headers=headers).status_code == 401
    admin = {"Authorization": "Bearer admin-key"}
    r = httpx.put(srv.url + "/router/replicas", json=body, headers=admin)
    assert r.status_code == 200 and r.json()[0]["name"] == "r1"
    bad = httpx.put(srv.url + "/router/replicas", json=[{"name": "x"}], headers=admin)
    assert bad.status_code == 400 and "replica targets" in bad.json()["error"]["message"]
    assert (
        _client(srv, "client-key").completions.create(model="m", prompt="x").choices[0].text == "a"
    )
    # Without an admin key (in-process use) the replica set cannot be set over HTTP.
    _, open_srv = router_server()
    assert httpx.put(open_srv.url + "/router/replicas", json=body).status_code == 401


def test_a_draining_replica_gets_no_new_request(servers, router_server) -> None:
    served: Counter = Counter()
    a, b = servers(upstream_app("a", served)), servers(upstream_app("b", served))
    router, srv = router_server()
    router.set_replicas(
        [
            ReplicaTarget("a", a, 10.0, True, draining=True),
            ReplicaTarget("b", b, 1.0, True),
        ]
    )
    for _ in range(4):
        assert _client(srv).completions.create(model="m", prompt="x").choices[0].text == "b"
    assert served["a"] == 0
    assert {r["name"]: r["draining"] for r in router.snapshot()} == {"a": True, "b": False}


def test_request_in_flight_on_a_replica_that_dies_is_retried_on_another(
    servers, router_server
) -> None:
    """The replica accepts the request, then its connection drops before any answer (a
    SIGKILLed engine): the router sends it to the other replica; the client sees one 200."""
    import socket
    import threading

    served: Counter = Counter()
    good = servers(upstream_app("good", served))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    got: list[bytes] = []

    def accept_then_drop() -> None:
        conn, _ = lsock.accept()
        got.append(conn.recv(65536))
        conn.close()  # dies mid-request

    threading.Thread(target=accept_then_drop, daemon=True).start()
    dying = f"http://127.0.0.1:{lsock.getsockname()[1]}"
    router, srv = router_server()
    router.set_replicas(
        [ReplicaTarget("dying", dying, 10.0, True), ReplicaTarget("good", good, 1.0, True)]
    )
    out = _client(srv).completions.create(model="m", prompt="x")
    lsock.close()
    assert out.choices[0].text == "good" and got and got[0].startswith(b"POST /v1/completions")
    assert {r["name"]: r["ready"] for r in router.snapshot()} == {"dying": False, "good": True}


def _router_proc(port: int, env: dict[str, str], host: str = "127.0.0.1"):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "skybroker.router", "--name", "demo", "--host", host]
    cmd += ["--port", str(port)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SKYBROKER_ROUTER_")}
    return subprocess.Popen(
        cmd, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_router_process_refuses_off_loopback_without_a_key_and_serves_with_keys(
    servers,
) -> None:
    proc = _router_proc(free_port(), {"SKYBROKER_ROUTER_ADMIN_KEY": "adm"}, host="0.0.0.0")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "needs a key in SKYBROKER_ROUTER_API_KEY" in out
    proc = _router_proc(free_port(), {})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "SKYBROKER_ROUTER_ADMIN_KEY is not set" in out
    served: Counter = Counter()
    a = servers(upstream_app("a", served))
    port = free_port()
    env = {"SKYBROKER_ROUTER_API_KEY": "ck", "SKYBROKER_ROUTER_ADMIN_KEY": "adm"}
    proc = _router_proc(port, env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        body = [
            {"name": "r1", "url": a, "capacity_rps": 1.0, "ready": True, "api_key": "key-of-r1"}
        ]
        headers = {"Authorization": "Bearer adm"}
        assert httpx.put(url + "/router/replicas", json=body, headers=headers).is_success
        client = openai.OpenAI(base_url=url + "/v1", api_key="ck", max_retries=0)
        assert client.completions.create(model="m", prompt="x").choices[0].text == "a"
        assert served["auth:Bearer key-of-r1"] == 1
        # The replica's key came with the replica set; the admin route does not show it.
        shown = httpx.get(url + "/router/replicas", headers=headers).text
        assert "key-of-r1" not in shown
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_load_counts_arrivals_tokens_and_in_flight_behind_the_admin_key(
    servers, router_server
) -> None:
    served: Counter = Counter()
    a = servers(upstream_app("a", served, delay_s=0.3))
    router, srv = router_server(admin_key="admin-key")
    router.set_replicas([ReplicaTarget("r1", a, 1.0, ready=True, probed_at=time.time())])
    client = _client(srv)
    for _ in range(3):  # usage in the body: 1 prompt token, 1 completion token each
        client.completions.create(model="m", prompt="x")
    # streamed, no usage: the prompt's length (~4 chars a token), one token per chunk
    list(client.completions.create(model="m", prompt="y" * 400, stream=True))
    admin = {"Authorization": "Bearer admin-key"}
    assert httpx.get(srv.url + "/router/load").status_code == 401
    assert httpx.get(srv.url + "/router/load?window_s=0", headers=admin).status_code == 400
    load = httpx.get(srv.url + "/router/load?window_s=60", headers=admin).json()
    assert load["arrivals"] == 4 and load["completed"] == 4
    assert load["input_tokens"] == pytest.approx((3 * 1 + 100) / 4)
    assert load["output_tokens"] == pytest.approx((3 * 1 + 3) / 4)
    assert load["rate"] > 0 and load["in_flight"] == {"r1": 0}
    assert 0.3 <= load["ttft_s"]["p50"] <= load["ttft_s"]["p99"] < 10  # upstream waits 0.3 s
    with ThreadPoolExecutor(2) as pool:  # requests in flight show per replica
        futs = [pool.submit(client.completions.create, model="m", prompt="x") for _ in range(2)]
        deadline = time.time() + 5
        while time.time() < deadline:
            busy = httpx.get(srv.url + "/router/load", headers=admin).json()["in_flight"]
            if busy["r1"] == 2:
                break
            time.sleep(0.02)
        assert busy == {"r1": 2}
        [f.result() for f in futs]


def metrics_app(stats: EngineStats, key: str) -> FastAPI:
    """An engine's /metrics (the engine's own renderer) behind the replica's key."""
    app = FastAPI()
    metrics = ServerMetrics("tiny", lambda: stats)

    @app.get("/metrics")
    async def page(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": "key"}, 401)
        return Response(metrics.render(), media_type="text/plain")

    return app


def test_load_reads_each_ready_replicas_queue_and_kv_use_with_its_key(
    servers, router_server
) -> None:
    a = servers(metrics_app(EngineStats(num_running=8, num_waiting=5, kv_usage=0.93), "rk"))
    b = servers(metrics_app(EngineStats(num_running=1, kv_usage=0.1), "rk"))
    c = servers(metrics_app(EngineStats(num_waiting=9), "other"))  # refuses the router's key
    router, srv = router_server(admin_key="adm")
    router.set_replicas(
        [ReplicaTarget("r1", a, 1.0, True, api_key="rk"), ReplicaTarget("r2", b, 1.0, True, api_key="rk"),
         ReplicaTarget("r3", c, 1.0, True, api_key="rk"), ReplicaTarget("r4", b, 1.0, False, api_key="rk")]
    )  # fmt: skip
    load = httpx.get(srv.url + "/router/load", headers={"Authorization": "Bearer adm"}).json()
    assert load["engines"] == {
        "r1": {"num_requests_waiting": 5, "num_requests_running": 8, "kv_cache_usage_perc": 0.93},
        "r2": {"num_requests_waiting": 0, "num_requests_running": 1, "kv_cache_usage_perc": 0.1},
    }  # r3 did not answer with its gauges, r4 is not ready


def test_engine_gauges_sum_label_sets_and_skip_what_is_not_a_gauge_of_theirs() -> None:
    page = (
        "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 2.0\n'
        'vllm:num_requests_waiting{model_name="b"} 3.0\n'
        'vllm:kv_cache_usage_perc{model_name="a"} 0.5\nvllm:kv_cache_usage_perc 0.7\n'
        "vllm:num_requests_running NaN-ish\nengine:num_requests_waiting 40\n"
    )
    assert engine_gauges(page) == {"num_requests_waiting": 5.0, "kv_cache_usage_perc": 0.7}
