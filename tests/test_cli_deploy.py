"""The deployment CLI (launch/status/down/logs/server) through a live broker API over HTTP."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from skybroker import server
from skybroker.api import create_app
from skybroker.cli import app
from skybroker.controller import Controller
from skybroker.provision.local import free_port
from skybroker.state import Store

runner = CliRunner()
TINY_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
               "max_position_embeddings": 256}  # fmt: skip


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    models = tmp_path / "models"  # where `tiny-llama` resolves (its config.json is enough)
    (models / "tiny-llama").mkdir(parents=True)
    (models / "tiny-llama" / "config.json").write_text(json.dumps(TINY_CONFIG))
    monkeypatch.setenv("SKYBROKER_MODEL_DIRS", str(models))
    monkeypatch.delenv("SKYBROKER_API_URL", raising=False)
    monkeypatch.delenv(server.TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    """One real Controller for the module (tests that launch also tear down)."""
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('cli') / 'state.db'}")
    c = Controller(store)
    yield c
    c.close()
    store.close()


@pytest.fixture(scope="module")
def api_url(controller: Controller) -> Iterator[str]:
    """The real app served by uvicorn in a thread on a free port."""
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(controller), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def _cli(*args: str, input: str | None = None):
    result = runner.invoke(app, list(args), input=input)
    assert "Traceback" not in result.output, result.output
    return result


def test_help_lists_the_deployment_commands() -> None:
    out = _cli("--help").output
    for cmd in ("launch", "status", "down", "logs", "server"):
        assert cmd in out
    out = _cli("server", "--help").output
    for cmd in ("start", "stop", "status"):
        assert cmd in out


def test_status_without_deployments(api_url: str) -> None:
    r = _cli("status", "--api-url", api_url)
    assert r.exit_code == 0 and "no deployments" in r.output


def test_status_of_unknown_name_is_a_clear_error(api_url: str) -> None:
    r = _cli("status", "ghost", "--api-url", api_url)
    assert r.exit_code == 1
    assert "no deployment named 'ghost'" in r.output


def test_down_unknown_is_fine_twice(api_url: str) -> None:
    for _ in range(2):
        r = _cli("down", "ghost", "--api-url", api_url)
        assert r.exit_code == 0, r.output
        assert "nothing to tear down" in r.output


def test_logs_of_unknown_deployment(api_url: str) -> None:
    r = _cli("logs", "ghost", "--api-url", api_url)
    assert r.exit_code == 1 and "no deployment named 'ghost'" in r.output


def test_launch_missing_file() -> None:
    r = _cli("launch", "/nonexistent/spec.yaml", "--yes")
    assert r.exit_code == 2 and "spec file /nonexistent/spec.yaml does not exist" in r.output
    r = _cli("launch", "/nonexistent/spec.yaml", "--yes", "--api-url", "http://127.0.0.1:9")
    assert r.exit_code == 1 and "cannot read spec" in r.output


def test_launch_of_a_local_model_without_weights_fails_before_anything_starts(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "nowhere.yaml"
    spec.write_text(TINY_SPEC.replace("name: tiny-llama", "name: org/not-on-this-machine"))
    r = _cli("launch", str(spec), "--yes")
    assert r.exit_code == 2, r.output
    assert "model: no copy of 'org/not-on-this-machine' on this machine" in r.output
    assert server.status().running is False and not server.pid_path().exists()


def test_launch_bad_infra_option() -> None:
    r = _cli("launch", "x.yaml", "--infra", "moon")
    assert r.exit_code == 1 and "local or skypilot" in r.output


def test_launch_invalid_spec_names_the_field(api_url: str, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: chat\nmodel: m\nworkload: {rate: -1}\n")
    r = _cli("launch", str(spec), "--yes", "--api-url", api_url)
    assert r.exit_code == 1
    assert "workload.rate" in r.output and "greater than 0" in r.output


def test_api_url_from_env(api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYBROKER_API_URL", api_url)
    assert _cli("status").exit_code == 0


def test_unreachable_broker_is_a_clear_error() -> None:
    r = _cli("status", "--api-url", f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 1 and "cannot reach the broker" in r.output


def test_remote_broker_with_token(controller: Controller, monkeypatch) -> None:
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(controller, token="tok"), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        r = _cli("status", "--api-url", url)
        assert r.exit_code == 1 and "token" in r.output
        monkeypatch.setenv(server.TOKEN_ENV, "tok")
        assert _cli("status", "--api-url", url).exit_code == 0
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_server_status_and_stop_when_not_running() -> None:
    r = _cli("server", "status")
    assert r.exit_code == 1 and "not running" in r.output
    r = _cli("server", "stop")
    assert r.exit_code == 0 and "not running" in r.output


def test_server_start_refuses_public_bind_without_token() -> None:
    r = _cli("server", "start", "--host", "0.0.0.0")
    assert r.exit_code == 1 and "needs an API token" in r.output


TINY_SPEC = """\
name: tiny
infra: local
model:
  name: tiny-llama
  architecture: {num_layers: 2, hidden_size: 64, num_heads: 4, num_kv_heads: 2,
                 intermediate_size: 128, vocab_size: 256, max_position_embeddings: 256}
workload: {rate: 0.5, input_tokens: 16, output_tokens: 8}
slo: {ttft_ms: 5000, tpot_ms: 1000, percentile: 90}
engine: {max_model_len: 128, max_num_seqs: 4, kv_cache_gib: 0.1}
"""


def test_launch_asks_and_no_means_nothing_launched(
    api_url: str, tmp_path: Path, controller
) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    r = _cli("launch", str(spec), "--api-url", api_url, input="n\n")
    assert r.exit_code == 0, r.output
    assert "localhost" in r.output and "Launch this plan?" in r.output
    assert "not launched" in r.output
    assert controller.list() == []


def test_launch_detach_status_down(api_url: str, tmp_path: Path, controller) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    r = _cli("launch", str(spec), "--yes", "--detach", "--api-url", api_url)
    assert r.exit_code == 0, r.output
    assert "deployment tiny: PROVISIONING" in r.output
    assert controller.get("tiny") is not None
    key = controller.api_key("tiny")
    assert f"api key: {key}" in r.output  # shown at launch
    r = _cli("status", "tiny", "--show-key", "--api-url", api_url)
    assert r.exit_code == 0 and f"api key: {key}" in r.output  # and on asking
    r = _cli("status", "tiny", "--api-url", api_url)
    assert r.exit_code == 0 and key not in r.output  # only then
    r = _cli("status", "--show-key", "--api-url", api_url)
    assert r.exit_code == 1 and "--show-key needs a deployment NAME" in r.output

    r = _cli("status", "--api-url", api_url)
    assert r.exit_code == 0 and "tiny" in r.output and "0/1" in r.output
    r = _cli("status", "tiny", "--api-url", api_url)
    assert r.exit_code == 0 and "PENDING" in r.output and "created" in r.output
    listed = json.loads(_cli("status", "--json", "--api-url", api_url).output)
    assert [d["name"] for d in listed] == ["tiny"] and listed[0]["desired_replicas"] == 1
    one = json.loads(_cli("status", "tiny", "--json", "--api-url", api_url).output)
    assert one["name"] == "tiny" and [r["status"] for r in one["replicas"]] == ["PENDING"]
    assert one["spec"]["model"]["path"].endswith("tiny-llama")  # resolved by the broker

    r = _cli("launch", str(spec), "--yes", "--api-url", api_url)
    assert r.exit_code == 1 and "skybroker down tiny" in r.output  # the name is taken

    r = _cli("down", "tiny", "--api-url", api_url)
    assert r.exit_code == 0 and "torn down" in r.output
    assert controller.get("tiny") is None
    r = _cli("down", "tiny", "--api-url", api_url)
    assert r.exit_code == 0 and "nothing to tear down" in r.output


def test_launch_waits_shows_events_and_times_out_clearly(
    api_url: str, tmp_path: Path, controller
) -> None:
    """No reconcile loop runs here, so the deployment never gets ready: launch says so."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    r = _cli("launch", str(spec), "--yes", "--timeout", "1", "--api-url", api_url)
    assert r.exit_code == 1, r.output
    assert "created" in r.output and "plan: 1 x local/local/localhost" in r.output
    flat = " ".join(r.output.split())  # rich wraps lines at the terminal width
    assert "not ready after 1s (PROVISIONING)" in flat and "`skybroker down tiny`" in flat
    assert _cli("down", "tiny", "--api-url", api_url).exit_code == 0


def test_status_shows_failures_in_a_row_then_why_it_failed(
    api_url: str, tmp_path: Path, controller
) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    assert _cli("launch", str(spec), "--yes", "--detach", "--api-url", api_url).exit_code == 0
    try:
        controller._count_failure(controller.get("tiny"), "replica tiny-1 died; exit code 3")
        flat = " ".join(_cli("status", "tiny", "--api-url", api_url).output.split())
        assert re.search(r"1 replica failure\(s\) in a row; next launch in [0-2]s", flat), flat
        spot = ("aws", "us-east-1", "g5.xlarge", True)
        controller.spot.until["tiny"] = {spot: time.time() + 600}
        controller.health.suspect["tiny"] = time.time() - 40
        flat = " ".join(_cli("status", "tiny", "--api-url", api_url).output.split())
        assert "aws/us-east-1/g5.xlarge (spot) cools down: out of the plan for 10 more" in flat
        assert re.search(r"failed their probes for 4\ds: the broker's own network is", flat)
        controller.spot.forget("tiny")
        controller.health.suspect.clear()
        controller._fail(controller.get("tiny"), "5 failures in a row, giving up; exit code 3")
        r = _cli("status", "tiny", "--api-url", api_url)
        flat = " ".join(r.output.split())
        assert "FAILED" in flat and "5 failures in a row, giving up; exit code 3" in flat
    finally:
        assert _cli("down", "tiny", "--api-url", api_url).exit_code == 0
