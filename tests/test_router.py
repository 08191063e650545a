"""The router against small real OpenAI-style upstream servers (FastAPI under uvicorn).

The upstreams are test doubles of the engine server's HTTP surface (the end-to-end tests use
the real engine); the `openai` package is the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from skybroker.provision.local import free_port
from skybroker.router import ReplicaTarget, Router, RouterServer

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
    a = servers(upstream_app("a", served))
    router, srv = router_server(api_key="client-key", upstream_api_key="replica-key")
    router.set_replicas([ReplicaTarget("r1", a, 1.0, True)])
    with pytest.raises(openai.AuthenticationError):
        _client(srv, "wrong").completions.create(model="m", prompt="x")
    assert (
        _client(srv, "client-key").completions.create(model="m", prompt="x").choices[0].text == "a"
    )
    assert served["auth:Bearer replica-key"] == 1  # the client's key is not forwarded
