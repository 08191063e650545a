"""POST /v1/deployments?dry_run=true: plans, builds every replica, asks the provisioner to
validate it, answers what would be launched where at what $/h (200) and records nothing.
Through SkyPilot's real server: tests/test_provision_skypilot_server.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from skybroker.api import create_app
from skybroker.controller import Controller
from skybroker.state import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    controller = Controller(store)
    yield TestClient(create_app(controller)), controller
    controller.close()
    store.close()


def test_dry_run_of_the_example_launches_nothing(client, monkeypatch) -> None:
    http, controller = client
    monkeypatch.setitem(__import__("sys").modules, "sky", None)  # no SkyPilot: a clear 502
    monkeypatch.setitem(__import__("sys").modules, "sky.client", None)
    spec = (ROOT / "examples" / "chat-8b-us-eu.yaml").read_text()
    r = http.post(
        "/v1/deployments",
        params={"dry_run": "true"},
        content=spec,
        headers={"Content-Type": "application/yaml"},
    )
    assert r.status_code == 502, r.text
    assert "pip install 'skybroker[cloud]'" in r.json()["error"]["message"]
    assert controller.list() == []
