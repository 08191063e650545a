"""How the broker talks to one replica: its own key, and its pinned certificate if it has one.

Every replica has a key of its own (`keys.replica_api_key`, from its row: a replacement gets
a new one) that the router and the broker send as `Authorization: Bearer ...`. A replica
that serves HTTPS (every cloud replica) has its certificate in its handle (`info.tls_cert`,
public); clients trust exactly that certificate (`tls.pinned_context`). `replica_client(rep)`
is the one way the broker builds an HTTP client for a replica (its /health, /metrics and
API routes); `ReplicaClients` keeps one per replica for the controller's probes.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass

import httpx

from skybroker.keys import replica_api_key
from skybroker.state import Replica
from skybroker.tls import default_context, fingerprint, pinned_context


@dataclass(frozen=True)
class ReplicaAuth:
    """What a client needs to reach one replica: its key, and its certificate (None: plain
    HTTP, a replica on loopback)."""

    api_key: str
    tls_cert: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify`: the pinned certificate, or the default for plain HTTP."""
        return pinned_context(self.tls_cert) if self.tls_cert else default_context()

    @property
    def pin(self) -> str | None:
        return fingerprint(self.tls_cert) if self.tls_cert else None


def replica_auth(rep: Replica) -> ReplicaAuth:
    """The key and certificate of replica `rep` (nothing of it is stored but the certificate)."""
    cert = (rep.handle or {}).get("info", {}).get("tls_cert")
    return ReplicaAuth(replica_api_key(rep.name, rep.created_at), cert or None)


def replica_client(rep: Replica, timeout_s: float = 5.0) -> httpx.Client:
    """An HTTP client for replica `rep`: its base URL, its key sent, its certificate pinned.
    The caller closes it (`with replica_client(rep) as c: c.get("/metrics")`)."""
    auth = replica_auth(rep)
    return httpx.Client(
        base_url=rep.url or "", headers=auth.headers, verify=auth.verify(), timeout=timeout_s
    )


class ReplicaClients:
    """One client per replica, made again when its URL, key or certificate change."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[tuple[str | None, str, str | None], httpx.Client]] = {}

    def get(self, rep: Replica) -> httpx.Client:
        auth = replica_auth(rep)
        ident = (rep.url, auth.api_key, auth.tls_cert)
        with self._lock:
            old = self._clients.get(rep.name)
            if old is not None and old[0] == ident:
                return old[1]
            client = replica_client(rep, self.timeout_s)
            self._clients[rep.name] = (ident, client)
        if old is not None:
            old[1].close()
        return client

    def forget(self, name: str) -> None:
        with self._lock:
            old = self._clients.pop(name, None)
        if old is not None:
            old[1].close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, {}
        for _, client in clients.values():
            client.close()
