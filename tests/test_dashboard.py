"""The dashboard's server side: its page and files, the plan map, the live series route, and
the series' arithmetic on a real engine's Prometheus text (the browser test drives the page)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from skybroker.api import create_app
from skybroker.catalog import load_catalog
from skybroker.catalog.geo import rtt_ms
from skybroker.controller import Controller
from skybroker.dashboard import ASSETS, STATIC
from skybroker.dashboard_series import (
    Sample,
    Series,
    histogram_quantile,
    parse_metrics,
)
from tests.broker_servers import controller_at

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "dash-t0ken"


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    with controller_at(tmp_path_factory.mktemp("dash")) as c:
        yield c


@pytest.fixture(scope="module")
def secured(controller: Controller) -> TestClient:
    return TestClient(create_app(controller, token=TOKEN))


def test_the_page_and_its_files_are_open_and_hold_no_secret(secured: TestClient) -> None:
    page = secured.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert TOKEN not in page.text
    for name, kind in ASSETS.items():
        r = secured.get(f"/dashboard/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert r.content == (STATIC / name).read_bytes()
    for src in ('src="/dashboard/static/', 'href="/dashboard/static/'):
        assert src in page.text  # everything from this server: no CDN
    assert "http" not in page.text.replace("http://www.w3.org", "")


@pytest.mark.parametrize("name", ["make_world.py", "..%2Fapi.py", "nope.js"])
def test_only_the_dashboard_files_are_served(secured: TestClient, name: str) -> None:
    r = secured.get(f"/dashboard/static/{name}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_the_series_route_follows_the_api_rules(secured: TestClient) -> None:
    r = secured.get("/v1/deployments/nope/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = secured.get("/v1/deployments/nope/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "name"


def test_a_plan_comes_with_its_map(secured: TestClient) -> None:
    r = secured.post(
        "/v1/plans",
        content=(ROOT / "examples" / "chat-8b-us-eu.yaml").read_bytes(),
        headers={"Content-Type": "application/yaml", "Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200, r.text
    plan, where = r.json()["plan"], r.json()["map"]
    catalog = load_catalog()
    users = {u["name"]: u for u in where["users"]}
    assert set(users) == {"us-east", "eu-west"}
    assert math.isclose(users["us-east"]["rate"], 12.0) and users["us-east"]["lat"] is not None
    sites = {s["id"]: s for s in where["sites"]}
    assert set(sites) == {f"{p['cloud']}/{p['region']}" for p in plan["placements"]}
    assert sum(s["replicas"] for s in sites.values()) == sum(
        p["replicas"] for p in plan["placements"]
    )
    assert math.isclose(sum(f["rate"] for f in where["flows"]), 20.0, rel_tol=1e-3)
    for f in where["flows"]:
        region = catalog.region_of(*f["site"].split("/"))
        u = users[f["user"]]
        assert f["rtt_ms"] == round(rtt_ms((u["lat"], u["lon"]), region), 1)
        assert f["rtt_ms"] <= where["max_rtt_ms"]  # the plan keeps the SLO's RTT limit


# ---------------------------------------------------------------- the series' arithmetic


def _engine_text(ttfts: list[float], tpot: float = 0.02, kv: float = 0.25) -> str:
    """/metrics of the engine server's own registry after requests with these TTFTs."""
    pytest.importorskip("prometheus_client")
    from engine.server.metrics import EngineStats, ServerMetrics

    m = ServerMetrics("m", lambda: EngineStats(num_running=2, num_waiting=3, kv_usage=kv))
    for t in ttfts:
        m.observe_finished("stop", 10, [11], t, t + 10 * tpot)
    return m.render().decode()


def test_parse_a_real_engine_scrape() -> None:
    s = parse_metrics(_engine_text([0.03, 0.07, 0.3]))
    assert s.gauges == {"kv_cache": 0.25, "running": 2.0, "waiting": 3.0}
    ttft = s.histograms["ttft"]
    assert ttft[math.inf] == 3 and ttft[0.04] == 1 and ttft[0.08] == 2
    assert math.isclose(histogram_quantile(0.5, s.histograms["tpot"]), 0.0175, rel_tol=1e-6)


def test_histogram_quantile_interpolates_as_prometheus() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.3)  # 10 + (20/20 of 0.1..0.5)/2
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 9.6 / 10)
    assert histogram_quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 5.0}) == 0.1  # past the last bound


def _sample(t: float, ttfts: list[float], rate: float = 1.0) -> Sample:
    load = {"rate": rate, "in_flight": {"r-1": 1}}
    return Sample(t, load, {"r-1": parse_metrics(_engine_text(ttfts))})


def test_points_cover_the_window_only() -> None:
    series = Series()
    series.add(_sample(1000.0, [5.0] * 10))  # slow requests, long ago
    series.add(_sample(1031.0, [5.0] * 10 + [0.03] * 10))  # then ten fast ones
    series.add(_sample(1040.0, [5.0] * 10 + [0.03] * 10))  # then none
    first, window, later = series.points()
    assert first["ttft_s"]["p50"] > 2.5  # since the engine started: the slow ones
    assert window["ttft_s"]["p99"] < 0.04  # the last 30 s: only the fast ones
    assert later["ttft_s"] == window["ttft_s"]  # its window reaches back to 1010: the same ten
    assert window["replicas"]["r-1"] == {"kv_cache": 0.25, "running": 2.0, "waiting": 3.0,
                                         "in_flight": 1}  # fmt: skip
    json.dumps(series.points())  # JSON as it is


def test_a_restarted_engine_counts_from_zero() -> None:
    series = Series()
    series.add(_sample(1000.0, [5.0] * 50))
    series.add(_sample(1040.0, [0.03] * 4))  # fewer counts than before: a new process
    assert series.points()[1]["ttft_s"]["p99"] < 0.04


def test_a_window_without_requests_has_no_latency_and_old_samples_go() -> None:
    series = Series()
    series.add(_sample(0.0, []))
    assert series.points()[0]["ttft_s"] == {"p50": None, "p99": None}
    series.add(Sample(5000.0, None, {}))  # the router did not answer, no engine did
    assert len(series.samples) == 1 and series.points()[0]["rate"] is None


# ---------------------------------------------------------------- `skybroker dashboard`


@pytest.mark.parametrize(
    ("env", "tty", "browser", "opens"),
    [
        ({"DISPLAY": ":0"}, True, "gui", True),
        ({"DISPLAY": ":0", "CI": "true"}, True, "gui", False),  # CI: never
        ({}, True, "gui", False),  # no display
        ({"DISPLAY": ":0"}, False, "gui", False),  # output not a terminal
        ({"DISPLAY": ":0"}, True, "console", False),  # it would take over the terminal
        ({"DISPLAY": ":0"}, True, None, False),  # none at all
    ],
)
def test_a_browser_opens_only_where_it_cannot_hang(
    monkeypatch: pytest.MonkeyPatch, env: dict, tty: bool, browser: str | None, opens: bool
) -> None:
    import sys
    import webbrowser

    from skybroker.deploy_cli import _gui_browser

    for var in ("CI", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)

    def get() -> object:
        if browser is None:
            raise webbrowser.Error("could not locate runnable browser")
        if browser == "console":
            return webbrowser.GenericBrowser("lynx")
        return webbrowser.BackgroundBrowser("xdg-open")

    monkeypatch.setattr(webbrowser, "get", get)
    assert (_gui_browser() is not None) == opens
