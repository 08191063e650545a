"""The router: one OpenAI-compatible endpoint per deployment in front of its replicas.

Requests (streaming included) go to the ready replica with the least outstanding requests
per unit of planned capacity (requests/s). A replica the router cannot connect to (or that
answers 503: loading, draining, overloaded) is skipped and the request retried on another;
a connection failure also marks it unready here until the controller's next successful
health probe. The router never sends to a replica the controller has not marked ready, nor a
new request to one it is draining (its in-flight requests finish; `outstanding` says how many).

It counts its load (`skybroker.router_load.LoadCounter`): arrivals, and input and output tokens of finished
requests (from the responses' `usage`, else estimated from the prompt's length and the
streamed chunks), which `GET /router/load?window_s=30` returns with the in-flight requests
per replica and each ready replica's queue and KV use (`engines`: vLLM's
`num_requests_waiting`, `num_requests_running`, `kv_cache_usage_perc`, read from its
/metrics with the replica's key at that moment); the controller's autoscaler reads it.

Clients send the deployment's key (`Authorization: Bearer KEY`, compared in constant time).
The controller sets the replica set through the admin routes (`PUT /router/replicas`, with the
router's admin key), each replica with its own key, which the router sends it in place of the
client's, and, for a replica serving HTTPS, its certificate: the router trusts exactly that
one (`skybroker.tls.pinned_context`), one connection pool per certificate. Runs as an ASGI
app (`Router.app`), in a thread (`RouterServer`), or as a process of its own
(`python -m skybroker.router`, see `main`): that one outlives the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from skybroker.keys import same_key
from skybroker.router_load import KEEP_S, LoadCounter, engine_gauges
from skybroker.tls import default_context, fingerprint, pinned_context

API_KEY_ENV = "SKYBROKER_ROUTER_API_KEY"  # clients' key (the deployment's endpoint key)
ADMIN_KEY_ENV = "SKYBROKER_ROUTER_ADMIN_KEY"  # the controller's key for /router/*

_HOP_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "proxy-authorization",
    "te",
    "trailer",
}
# Failures before a response began: the replica died or is gone; the request goes elsewhere.
_RETRYABLE = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


@dataclass
class ReplicaTarget:
    """A replica as the controller tells the router about it."""

    name: str
    url: str  # engine base URL, no /v1
    capacity_rps: float  # planned capacity: the weight
    ready: bool
    probed_at: float = 0.0  # time of the last successful /health probe
    draining: bool = False  # no new requests; in-flight ones finish
    api_key: str | None = None  # sent to this replica (never shown by GET /router/replicas)
    tls_cert: str | None = None  # PEM: the only certificate this replica may show (https)


@dataclass
class _Upstream:
    target: ReplicaTarget
    outstanding: int = 0
    served: int = 0
    failed_at: float | None = None  # connection failure seen by the router

    @property
    def usable(self) -> bool:
        return self.target.ready and not self.target.draining and self.failed_at is None


_USAGE = re.compile(rb'"prompt_tokens"\s*:\s*(\d+).*?"completion_tokens"\s*:\s*(\d+)', re.S)


def _prompt_tokens(body: bytes) -> int:
    """A prompt's tokens estimated from its text (about 4 characters a token)."""
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        return 0
    if not isinstance(req, dict):
        return 0
    text = req.get("prompt") or ""
    if isinstance(req.get("messages"), list):
        text = " ".join(str(m.get("content", "")) for m in req["messages"] if isinstance(m, dict))
    return max(1, len(str(text)) // 4)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )


class Router:
    """Least-outstanding-requests load balancer weighted by planned capacity, with retry."""

    def __init__(
        self,
        name: str,
        api_key: str | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 600.0,
        admin_key: str | None = None,
    ) -> None:
        self.name = name
        self.api_key = api_key
        self.admin_key = admin_key  # None: the admin routes read-only and open (in-process use)
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._lock = threading.Lock()
        self._upstreams: dict[str, _Upstream] = {}
        self._client: httpx.AsyncClient | None = None
        self._pinned: dict[str, httpx.AsyncClient] = {}  # certificate's SHA-256 -> pool
        self.load = LoadCounter()
        self.app = self._build_app()

    # -- replica set (called from the controller's thread) -------------------------------------

    def set_replicas(self, targets: list[ReplicaTarget]) -> None:
        """Replace the replica set; a router-seen failure clears only after a newer probe."""
        with self._lock:
            fresh: dict[str, _Upstream] = {}
            for t in targets:
                up = self._upstreams.get(t.name) or _Upstream(target=t)
                up.target = t
                if up.failed_at is not None and t.ready and t.probed_at > up.failed_at:
                    up.failed_at = None
                fresh[t.name] = up
            self._upstreams = fresh

    def mark_failed(self, name: str) -> None:
        with self._lock:
            up = self._upstreams.get(name)
            if up is not None:
                up.failed_at = time.time()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "name": u.target.name,
                    "url": u.target.url,
                    "capacity_rps": u.target.capacity_rps,
                    "ready": u.usable,
                    "draining": u.target.draining,
                    "outstanding": u.outstanding,
                    "served": u.served,
                }
                for u in self._upstreams.values()
            ]

    def ready_count(self) -> int:
        with self._lock:
            return sum(u.usable for u in self._upstreams.values())

    def _acquire(self, exclude: set[str]) -> _Upstream | None:
        """The usable replica with the lowest (outstanding + 1) / capacity; counts it busy."""
        with self._lock:
            candidates = [
                u for u in self._upstreams.values() if u.usable and u.target.name not in exclude
            ]
            if not candidates:
                return None
            best = min(
                candidates,
                key=lambda u: ((u.outstanding + 1) / max(u.target.capacity_rps, 1e-9), u.served),
            )
            best.outstanding += 1
            best.served += 1
            return best

    def _release(self, up: _Upstream) -> None:
        with self._lock:
            up.outstanding -= 1

    # -- load ---------------------------------------------------------------------------------

    async def load_report(self, window_s: float, timeout_s: float = 2.0) -> dict[str, Any]:
        """`GET /router/load`'s body: the window's arrivals and mix, requests in flight per
        replica, and the ready replicas' engine gauges (a replica that does not answer its
        /metrics within `timeout_s` is left out of `engines`)."""
        body = self.load.window(window_s)
        body["in_flight"] = {r["name"]: r["outstanding"] for r in self.snapshot()}
        with self._lock:
            targets = [u.target for u in self._upstreams.values() if u.usable]

        async def scrape(client: httpx.AsyncClient, t: ReplicaTarget) -> tuple[str, Any]:
            headers = {"authorization": f"Bearer {t.api_key}"} if t.api_key else {}
            try:
                r = await client.get(t.url + "/metrics", headers=headers, timeout=timeout_s)
            except httpx.HTTPError:
                return t.name, None
            return t.name, engine_gauges(r.text) if r.status_code == 200 else None

        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for t in targets:
                if self._client is not None:  # the served router's pools (pinned for HTTPS)
                    clients.append(await self._client_for(t))
                    continue
                # an in-process router nobody serves (a fresh default context costs ~0.4 s)
                verify = pinned_context(t.tls_cert) if t.tls_cert else default_context()
                clients.append(await stack.enter_async_context(httpx.AsyncClient(verify=verify)))
            got = await asyncio.gather(
                *(scrape(c, t) for c, t in zip(clients, targets, strict=True))
            )
        body["engines"] = {name: g for name, g in got if g}
        return body

    # -- HTTP ---------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
            try:
                yield
            finally:
                await self._client.aclose()
                self._client = None
                for client in self._pinned.values():
                    await client.aclose()
                self._pinned.clear()

        app = FastAPI(title=f"skybroker router: {self.name}", lifespan=lifespan)

        @app.get("/health")
        async def health() -> JSONResponse:
            n = self.ready_count()
            return JSONResponse({"deployment": self.name, "ready_replicas": n}, 200 if n else 503)

        @app.get("/router/replicas")
        async def replicas(request: Request) -> JSONResponse:
            if self.admin_key is not None and not self._bearer(request, self.admin_key):
                return _error(401, "missing or wrong admin key", "auth_error")
            return JSONResponse(self.snapshot())

        @app.get("/router/load")
        async def load(request: Request, window_s: float = 30.0) -> JSONResponse:
            if self.admin_key is not None and not self._bearer(request, self.admin_key):
                return _error(401, "missing or wrong admin key", "auth_error")
            if not 0 < window_s <= KEEP_S:
                return _error(400, f"window_s must be in (0, {KEEP_S:.0f}]", "invalid_request")
            return JSONResponse(await self.load_report(window_s))

        @app.put("/router/replicas")
        async def set_replicas(request: Request) -> JSONResponse:
            if self.admin_key is None or not self._bearer(request, self.admin_key):
                return _error(401, "missing or wrong admin key", "auth_error")
            try:
                targets = [ReplicaTarget(**t) for t in await request.json()]
            except (ValueError, TypeError) as e:
                return _error(400, f"a list of replica targets, please: {e}", "invalid_request")
            self.set_replicas(targets)
            return JSONResponse(self.snapshot())

        @app.api_route("/v1/{path:path}", methods=["GET", "POST", "DELETE"])
        async def proxy(path: str, request: Request) -> Response:
            return await self.forward(request, f"/v1/{path}")

        return app

    @staticmethod
    def _bearer(request: Request, key: str) -> bool:
        return same_key(request.headers.get("authorization", ""), f"Bearer {key}")

    def _authorized(self, request: Request) -> bool:
        return self.api_key is None or self._bearer(request, self.api_key)

    @staticmethod
    def _upstream_headers(request: Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers.pop("authorization", None)
        return headers

    async def _client_for(self, target: ReplicaTarget) -> httpx.AsyncClient:
        """The shared pool for plain HTTP; for HTTPS the pool that trusts only the replica's
        certificate (pools of certificates no replica shows any more are closed here)."""
        assert self._client is not None, "router app not started (lifespan)"
        if not target.tls_cert:
            return self._client
        pin = fingerprint(target.tls_cert)
        client = self._pinned.get(pin)
        if client is not None:
            return client
        with self._lock:
            certs = [u.target.tls_cert for u in self._upstreams.values()]
        live = {fingerprint(c) for c in certs if c}
        stale = [self._pinned.pop(p) for p in list(self._pinned) if p not in live]
        client = self._pinned[pin] = httpx.AsyncClient(  # before any await: made once
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            verify=pinned_context(target.tls_cert),
        )
        for old in stale:
            await old.aclose()
        return client

    async def forward(self, request: Request, path: str) -> Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "auth_error")
        assert self._client is not None, "router app not started (lifespan)"
        body = await request.body()
        headers = self._upstream_headers(request)
        arrived = time.monotonic()
        if path != "/v1/models":  # a listing is no load
            self.load.arrived()
        tried: set[str] = set()
        last_503: tuple[bytes, dict[str, str]] | None = None
        while True:
            up = self._acquire(tried)
            if up is None:
                break
            tried.add(up.target.name)
            client = await self._client_for(up.target)
            sent = headers
            if up.target.api_key:
                sent = {**headers, "authorization": f"Bearer {up.target.api_key}"}
            upstream_req = client.build_request(
                request.method,
                up.target.url + path,
                params=request.query_params,
                headers=sent,
                content=body,
            )
            try:
                resp = await client.send(upstream_req, stream=True)
            except _RETRYABLE:
                self.mark_failed(up.target.name)
                self._release(up)
                continue
            if resp.status_code == 503:  # loading, draining or overloaded: try another
                last_503 = (await resp.aread(), dict(resp.headers))
                await resp.aclose()
                self._release(up)
                continue
            return self._relay(resp, up, body if request.method == "POST" else None, arrived)
        if last_503 is not None:
            content, hdrs = last_503
            keep = {k: v for k, v in hdrs.items() if k.lower() not in _HOP_HEADERS}
            return Response(content, status_code=503, headers=keep)
        return _error(
            503, f"deployment {self.name!r} has no ready replica right now", "service_unavailable"
        )

    def _relay(
        self, resp: httpx.Response, up: _Upstream, request: bytes | None, arrived: float
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            tail, chunks, first = b"", 0, 0.0
            try:
                async for chunk in resp.aiter_raw():
                    first = first or time.monotonic() - arrived
                    tail, chunks = (tail + chunk)[-4096:], chunks + chunk.count(b"data:")
                    yield chunk
            except httpx.TransportError:
                self.mark_failed(up.target.name)  # the replica died mid-response
                raise
            finally:
                await resp.aclose()
                self._release(up)
                if request is not None and resp.status_code == 200:
                    self._count(request, tail, chunks, first)

        headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
        if "content-length" in resp.headers and "content-encoding" in resp.headers:
            headers["content-length"] = resp.headers["content-length"]
        return StreamingResponse(body(), status_code=resp.status_code, headers=headers)

    def _count(self, request: bytes, tail: bytes, chunks: int, first_byte_s: float) -> None:
        usage = _USAGE.findall(tail)
        if usage:
            prompt, completion = (int(x) for x in usage[-1])
        else:  # no usage: the prompt's length, one token per streamed chunk
            prompt, completion = _prompt_tokens(request), max(0, chunks - 1)
        self.load.finished(prompt, completion, first_byte_s)


class RouterServer:
    """A router served by uvicorn in a background thread (one per deployment)."""

    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 0) -> None:
        self.router = router
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        config = uvicorn.Config(
            self.router.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name=f"router-{self.router.name}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"router for {self.router.name!r} did not start on {self.host}:{self.port}"
                )
            time.sleep(0.02)
        if self.port == 0:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None


def targets_json(targets: list[ReplicaTarget]) -> list[dict[str, Any]]:
    """The body of `PUT /router/replicas`."""
    return [asdict(t) for t in targets]


def main(argv: list[str] | None = None) -> None:
    """`python -m skybroker.router --name NAME --port PORT`: one deployment's router process.

    Keys come from the environment (never the command line, which any local user can read):
    SKYBROKER_ROUTER_API_KEY (clients) and SKYBROKER_ROUTER_ADMIN_KEY (the controller); the
    replicas' keys and certificates come with the replica set. It refuses to listen off loopback
    without a client key. SIGTERM stops accepting connections and lets in-flight requests
    finish (up to --shutdown-timeout seconds).
    """
    from skybroker.server import is_loopback

    p = argparse.ArgumentParser(prog="python -m skybroker.router", description=main.__doc__)
    p.add_argument("--name", required=True, help="the deployment")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--shutdown-timeout", type=int, default=30)
    args = p.parse_args(argv)
    api_key = os.environ.get(API_KEY_ENV) or None
    admin_key = os.environ.get(ADMIN_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        print(f"error: listening on {args.host} needs a key in {API_KEY_ENV}", file=sys.stderr)
        raise SystemExit(2)
    if admin_key is None:
        print(f"error: {ADMIN_KEY_ENV} is not set: nobody could set the replicas", file=sys.stderr)
        raise SystemExit(2)
    router = Router(args.name, api_key=api_key, admin_key=admin_key)
    config = uvicorn.Config(
        router.app,
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
