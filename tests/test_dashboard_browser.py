"""The web dashboard in a real browser: headless Chromium driven by selenium.

The broker API is served by uvicorn in a thread with the real Controller and its reconcile
loop (as `python -m skybroker.server` runs them); the deployment is the tiny Llama as a real
`engine.serve` replica. The pages must load with no console error, show the deployment, its
replica, its map and a TTFT chart with points after a few requests, and the plan page must
render the plan of examples/chat-8b-us-eu.yaml. SKYBROKER_SCREENSHOTS=DIR saves a screenshot
of each page there (docs/img holds the README's).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

if importlib.util.find_spec("engine.llm_engine") is None:
    pytest.skip("the engine (engine.llm_engine) is not in this tree", allow_module_level=True)

from skybroker.api import create_app
from skybroker.controller import Controller
from tests.broker_servers import reconciling_controller_at, served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TOKEN = "dashboard-test-token"


def _browser():  # -> selenium WebDriver
    if not (CHROMIUM and CHROMEDRIVER) or importlib.util.find_spec("selenium") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium, chromium-driver and selenium (.ci/run)")
        pytest.skip("needs chromium, chromium-driver (apt) and selenium")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser() -> Iterator:
    driver = _browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> Iterator[tuple[str, str, Controller]]:
    """(URL of an open broker, URL of one wanting TOKEN, the controller behind both)."""
    with (
        reconciling_controller_at(tmp_path_factory.mktemp("dashboard"), 0.2) as controller,
        served(create_app(controller, allowed_paths=[tiny_llama_dir])) as open_url,
        served(create_app(controller, token=TOKEN)) as locked_url,
    ):
        yield open_url, locked_url, controller


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _wait(driver, condition, timeout: float = 30.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, what)


def _shot(driver, name: str) -> None:
    where = os.environ.get("SKYBROKER_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return Math.max(400, document.body.scrollHeight)")
        driver.set_window_size(1280, height + 160)  # the whole page, below the window bars
        time.sleep(0.5)
        driver.save_screenshot(str(Path(where) / f"dashboard-{name}.png"))
        driver.set_window_size(1280, 900)


def _load(endpoint: str, key: str, seconds: float, workers: int = 3) -> None:
    """Chat requests from `workers` clients at once for `seconds`."""

    def client(i: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                http.post(f"{endpoint}/chat/completions", json={
                    "model": "tiny-llama", "max_tokens": 16 + 16 * i,
                    "messages": [{"role": "user", "content": "hello " * (4 + 8 * i)}]})  # fmt: skip
                time.sleep(0.5 * i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))


def test_plan_page_renders_the_example_plan(broker, browser) -> None:
    from selenium.webdriver.common.by import By

    url = broker[0]
    browser.get(f"{url}/dashboard#/plan")
    box = _wait(browser, lambda d: d.find_element(By.ID, "spec"), what="the spec box")
    browser.execute_script(
        "arguments[0].value = arguments[1]",
        box,
        (ROOT / "examples" / "chat-8b-us-eu.yaml").read_text(),
    )
    browser.find_element(By.ID, "plan-button").click()
    _wait(browser, lambda d: "Placements" in _text(d, "#plan-result"), 120, "the plan")
    result = _text(browser, "#plan-result")
    plan = httpx.post(f"{url}/v1/plans", content=(ROOT / "examples" / "chat-8b-us-eu.yaml").read_bytes(),
                      headers={"Content-Type": "application/yaml"}, timeout=120).json()  # fmt: skip
    for p in plan["plan"]["placements"]:
        assert f"{p['cloud']}/{p['region']}" in result and p["instance_type"] in result
    assert f"${plan['plan']['cost_per_hour']:.2f}/h" in result
    assert "plan saves" in result  # against the baselines
    # The map: the countries, a marker per user region and serving site, RTT on the flows.
    assert browser.find_elements(By.CSS_SELECTOR, "#plan-result .map image")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#plan-result .map circle.user")) == 2
    sites = {f"{p['cloud']}/{p['region']}" for p in plan["plan"]["placements"]}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#plan-result .map rect.site")) == len(sites)
    assert " ms" in _text(browser, "#plan-result .map text.rtt")
    _shot(browser, "plan")
    assert _console_errors(browser) == []


def test_a_bad_spec_says_what_is_wrong(broker, browser) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{broker[0]}/dashboard#/plan")
    box = _wait(browser, lambda d: d.find_element(By.ID, "spec"))
    browser.execute_script("arguments[0].value = 'name: x\\nslo: {ttft_ms: -1}\\n'", box)
    browser.find_element(By.ID, "plan-button").click()
    _wait(browser, lambda d: "not planned" in _text(d, "#plan-result"), 60, "the error")
    assert "ttft_ms" in _text(browser, "#plan-result .error")
    # The API's 422 shows in the page; the browser logs the failed fetch itself, nothing else.
    assert all("422" in m for m in _console_errors(browser))


def test_deployment_pages_show_the_replica_map_and_live_latency(
    broker, browser, tiny_llama_dir: Path
) -> None:
    from selenium.webdriver.common.by import By

    url, _, controller = broker
    spec = {
        "name": "dash-tiny",
        "infra": "local",
        "model": {"name": "tiny-llama", "path": str(tiny_llama_dir)},
        "workload": {"rate": 0.05, "input_tokens": 16, "output_tokens": 8,
                     "users": {"eu-west": 0.5, "us-east": 0.5}},
        "slo": {"ttft_ms": 30000, "tpot_ms": 5000, "percentile": 90},
        "engine": {"max_model_len": 256, "kv_cache_gib": 0.05, "max_num_seqs": 8},
    }  # fmt: skip
    r = httpx.post(f"{url}/v1/deployments", json=spec, timeout=120)
    assert r.status_code == 202, r.text
    endpoint, key = r.json()["endpoint"], r.json()["api_key"]
    browser.get(f"{url}/dashboard#/d/dash-tiny")  # while it launches: no engine to read yet
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-ttft canvas"), what="charts")
    assert _console_errors(browser) == []
    controller.wait_ready("dash-tiny", timeout_s=300)

    browser.get(f"{url}/dashboard")
    _wait(browser, lambda d: "dash-tiny" in _text(d, "main table"), what="the deployments list")
    row = _text(browser, "main table")
    assert "READY" in row and "1/1" in row and endpoint in row
    assert key not in browser.page_source  # nothing secret in the page
    _shot(browser, "deployments")

    browser.find_element(By.LINK_TEXT, "dash-tiny").click()
    _wait(browser, lambda d: "healthy" in _text(d, "main"), what="the replica")
    rep = controller.replicas("dash-tiny")[0]
    assert rep.name in _text(browser, "main") and "created" in _text(browser, ".events")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".map circle.user")) == 2
    assert "this machine" in _text(browser, ".map .legend")
    for _ in range(4):  # a few requests through the endpoint
        chat = httpx.post(f"{endpoint}/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": "tiny-llama", "max_tokens": 8,
                                "messages": [{"role": "user", "content": "hello"}]})  # fmt: skip
        assert chat.status_code == 200, chat.text
    points = _wait(
        browser,
        lambda d: int(d.find_element(By.ID, "chart-ttft").get_attribute("data-points") or 0),
        60,
        "TTFT points",
    )
    assert points > 0
    last = httpx.get(f"{url}/v1/deployments/dash-tiny/metrics", timeout=30).json()["points"][-1]
    assert 0 < last["ttft_s"]["p50"] <= last["ttft_s"]["p99"] < 30  # the engine's histogram
    engine = last["replicas"][rep.name]
    assert 0 <= engine["kv_cache"] <= 1 and engine["in_flight"] == 0 and engine["waiting"] == 0
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-ttft canvas")
    _wait(browser, lambda d: int(d.find_element(By.ID, "chart-rate").get_attribute("data-points")))
    assert key not in browser.page_source
    if os.environ.get("SKYBROKER_SCREENSHOTS"):  # a minute of load for the picture
        _load(endpoint, key, seconds=60)
    _shot(browser, "deployment")
    assert _console_errors(browser) == []


def test_off_loopback_rules_the_page_asks_for_the_token(broker, browser) -> None:
    from selenium.webdriver.common.by import By

    locked = broker[1]
    browser.get(f"{locked}/dashboard")  # the page itself is open: it holds nothing secret
    dialog = _wait(browser, lambda d: d.find_element(By.ID, "token-dialog"))
    _wait(browser, lambda d: dialog.get_attribute("open") is not None, what="the token prompt")
    browser.find_element(By.ID, "token-input").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    _wait(
        browser,
        lambda d: "dash-tiny" in _text(d, "main table") or "No deployments" in _text(d, "main"),
    )
    assert browser.execute_script("return sessionStorage.getItem('skybroker.token')") == TOKEN
    # The only console errors: the 401 that made the page ask.
    assert all("401" in m for m in _console_errors(browser))
