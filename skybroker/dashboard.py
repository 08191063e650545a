"""The web dashboard the broker server serves at /dashboard, and its live-series route.

One HTML page and its script (`skybroker/static/`, vendored with uPlot and a Natural Earth
world map: nothing is fetched from elsewhere) show the deployments, one deployment (its plan
as a map, placements, $/h against the baselines, replicas, events, live charts) and a plan
page (paste or upload a spec: `POST /v1/plans`, nothing launches). The page holds no secret:
its data comes from the REST API under the API's token rules. Where the server has a token,
the API answers 401 and the page asks for it, keeps it in the tab's sessionStorage and sends
it as `Authorization: Bearer`. Endpoint keys are never fetched.

`GET /v1/deployments/{name}/metrics` is the charts' data: the router's load and the engines'
/metrics, read here (`skybroker.dashboard_series`).
"""

from __future__ import annotations

from pathlib import Path as PathLib
from typing import Annotated, Any

from fastapi import FastAPI, Path
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

STATIC = PathLib(__file__).parent / "static"
PAGE = "dashboard.html"
ASSETS = {  # what /dashboard/static serves, and as what
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "world-110m.svg": "image/svg+xml",
}
HEADERS = {
    # Only this server's own scripts, styles and images; uPlot sizes its canvas in style=.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class SLOLines(BaseModel):
    ttft_ms: float | None
    tpot_ms: float | None
    percentile: float | None


class MetricsView(BaseModel):
    name: str
    window_s: float = Field(description="rates and latency percentiles are over this window")
    interval_s: float = Field(description="samples are at least this far apart")
    slo: SLOLines
    points: list[dict[str, Any]] = Field(
        description="oldest first: time, rate (req/s at the router), ttft_s and tpot_s "
        "{p50, p99} (null: no request finished in the window), and per engine replica its "
        "kv_cache (0-1), running, waiting and in_flight (at the router)"
    )


def add_dashboard(app: FastAPI, controller: Any, auth: list[Any]) -> None:
    """Add /dashboard (open: the page holds nothing secret), its static files and
    `GET /v1/deployments/{name}/metrics` (behind `auth`) to the broker's `app`."""
    from skybroker.api_errors import ApiError, ErrorResponse
    from skybroker.dashboard_series import MIN_INTERVAL_S, WINDOW_S, Series, take_sample

    def not_found(message: str, field: str) -> ApiError:
        return ApiError(404, "not_found", message, field)

    series: dict[str, Series] = {}

    @app.get("/dashboard", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / PAGE, media_type="text/html", headers=HEADERS)

    @app.get("/dashboard/static/{file}", include_in_schema=False)
    def static(file: str) -> FileResponse:
        if file not in ASSETS:
            raise not_found(f"no dashboard file {file!r}", "file")
        return FileResponse(STATIC / file, media_type=ASSETS[file], headers=HEADERS)

    @app.get(
        "/v1/deployments/{name}/metrics",
        tags=["deployments"],
        dependencies=auth,
        responses={404: {"model": ErrorResponse}},
    )
    async def deployment_metrics(name: Annotated[str, Path()]) -> MetricsView:
        """Live series for the dashboard's charts: request rate, TTFT/TPOT p50/p99, and per
        replica KV-cache use and queue; sampled when asked, kept 10 minutes."""
        import time

        from fastapi.concurrency import run_in_threadpool

        dep = await run_in_threadpool(controller.get, name)
        if dep is None:
            series.pop(name, None)
            raise not_found(f"no deployment named {name!r}", "name")
        s = series.setdefault(name, Series())
        async with s.lock:
            if s.due(time.time()):
                s.add(await take_sample(controller, name))
        slo = dep.spec.get("slo") or {}
        return MetricsView(
            name=name,
            window_s=WINDOW_S,
            interval_s=MIN_INTERVAL_S,
            slo=SLOLines(**{k: slo.get(k) for k in SLOLines.model_fields}),
            points=s.points(),
        )
