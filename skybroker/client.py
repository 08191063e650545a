"""The broker's HTTP client (httpx): what the CLI uses for launch/status/down/logs.

`BrokerClient()` talks to `--api-url` / $SKYBROKER_API_URL when given (a remote or shared
broker), else to the local broker server, which it starts in the background when none runs
(as SkyPilot does with its local API server). The token comes from $SKYBROKER_API_TOKEN or
$SKYBROKER_API_TOKEN_FILE; to the local server it also sends the owner key
(`skybroker.server.read_owner_key`), so specs name files on this user's disk. Every non-2xx answer becomes an `ApiError` carrying the server's
error shape (code, message, field).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from skybroker import server

OWNER_HEADER = "X-Skybroker-Owner"  # skybroker.api reads it; not imported (FastAPI is heavy)


@dataclass
class ApiError(Exception):
    """An error answered by the broker: HTTP status plus its JSON error body."""

    status: int
    code: str
    message: str
    field: str | None = None

    def __str__(self) -> str:
        return self.message


class BrokerUnavailable(Exception):
    """The broker server cannot be reached (message for a person)."""


def _error(r: httpx.Response) -> ApiError:
    try:
        body = r.json()["error"]
        return ApiError(r.status_code, body["code"], body["message"], body.get("field"))
    except (ValueError, KeyError, TypeError):
        return ApiError(r.status_code, "http_error", f"HTTP {r.status_code}: {r.text[:300]}")


class BrokerClient:
    """Calls the broker's REST API; one method per endpoint."""

    def __init__(
        self,
        api_url: str | None = None,
        token: str | None = None,
        *,
        autostart: bool = True,
        timeout: float = 120.0,
    ) -> None:
        api_url = api_url or os.environ.get(server.URL_ENV)
        headers: dict[str, str] = {}
        if api_url is None:
            if autostart:
                api_url = server.ensure_running().url
            else:
                st = server.status()
                if not st.running or st.info is None:
                    raise BrokerUnavailable(
                        "no broker server runs here: start one with `skybroker server start`"
                    )
                api_url = st.info.url
            owner = server.read_owner_key()  # only to this user's own local server
            if owner:
                headers[OWNER_HEADER] = owner
        self.api_url = api_url.rstrip("/")
        token = token if token is not None else server.read_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.api_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise BrokerUnavailable(f"cannot reach the broker at {self.api_url}: {e}") from None
        if r.status_code >= 400:
            raise _error(r)
        return r

    @staticmethod
    def _spec_body(spec_text: str) -> dict[str, Any]:
        return {"content": spec_text.encode(), "headers": {"Content-Type": "application/yaml"}}

    @staticmethod
    def _infra(infra: str | None) -> dict[str, str]:
        return {"infra": infra} if infra else {}

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health").json()

    def plan(self, spec_text: str, infra: str | None = None) -> dict[str, Any]:
        """POST /v1/plans: the plan for a YAML (or JSON) spec."""
        r = self._call("POST", "/v1/plans", params=self._infra(infra), **self._spec_body(spec_text))
        return r.json()

    def launch(
        self, spec_text: str, infra: str | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        """POST /v1/deployments: returns at once; poll `get` for progress. With `dry_run`,
        the validated replicas that would be launched (nothing is)."""
        params = {**self._infra(infra), **({"dry_run": "true"} if dry_run else {})}
        # A dry run waits for the provisioner to validate every replica (SkyPilot: minutes).
        timeout = {"timeout": max(self._http.timeout.read or 0, 900.0)} if dry_run else {}
        r = self._call(
            "POST", "/v1/deployments", params=params, **timeout, **self._spec_body(spec_text)
        )
        return r.json()

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/deployments").json()["deployments"]

    def get(self, name: str, events: int = 50) -> dict[str, Any]:
        return self._call(
            "GET", f"/v1/deployments/{quote(name, safe='')}", params={"events": events}
        ).json()

    def key(self, name: str) -> str:
        """GET /v1/deployments/{name}/key: the key its endpoint's clients send."""
        return self._call("GET", f"/v1/deployments/{quote(name, safe='')}/key").json()["api_key"]

    def delete(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/deployments/{quote(name, safe='')}").json()

    def logs(
        self, name: str, replica: int | None = None, tail: int = 200, *, probes: bool = False
    ) -> str:
        params: dict[str, Any] = {"tail": tail, "probes": probes}
        if replica is not None:
            params["replica"] = replica
        return self._call(
            "GET", f"/v1/deployments/{quote(name, safe='')}/logs", params=params
        ).json()["text"]

    def offerings(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/v1/catalog/offerings", params=params).json()

    def gpus(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/catalog/gpus").json()["gpus"]
