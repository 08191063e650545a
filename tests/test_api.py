"""The broker's REST API with httpx (FastAPI's TestClient): every endpoint, errors, auth."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml
from fastapi.testclient import TestClient

from skybroker.api import create_app
from skybroker.catalog import load_catalog
from skybroker.controller import Controller
from tests.broker_servers import controller_at
from tests.skypilot_env import hide_skypilot

TOKEN = "t0ken-for-tests"
TINY_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    """One real Controller for the module (tests that create deployments delete them)."""
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "models" / "tiny-llama").mkdir(parents=True)  # `tiny-llama` resolves to it
    (tmp / "models" / "tiny-llama" / "config.json").write_text(json.dumps(TINY_CONFIG))
    with controller_at(tmp, env={"SKYBROKER_MODEL_DIRS": str(tmp / "models")}) as c:
        yield c


@pytest.fixture(scope="module")
def client(controller: Controller) -> TestClient:
    return TestClient(create_app(controller))


def _error(r, status: int, code: str, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == code
    assert err["message"]
    assert err["field"] == field
    return err


# ---------------------------------------------------------------- health, docs


def test_health(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["deployments"] == 0 and body["pid"] > 0


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) >= {
        "/health",
        "/v1/plans",
        "/v1/deployments",
        "/v1/deployments/{name}",
        "/v1/deployments/{name}/logs",
        "/v1/deployments/{name}/key",
        "/v1/catalog/offerings",
        "/v1/catalog/gpus",
    }
    assert "delete" in paths["/v1/deployments/{name}"]
    body = paths["/v1/plans"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/yaml"} <= set(body)
    assert client.get("/docs").status_code == 200


def test_unknown_route_has_the_error_shape(client: TestClient) -> None:
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.put("/v1/catalog/gpus"), 405, "method_not_allowed")


# ---------------------------------------------------------------- catalog


def test_offerings_filters_match_catalog_query(client: TestClient) -> None:
    cat = load_catalog()
    want = cat.query(gpu="H100", cloud="aws,gcp", spot=False)
    r = client.get(
        "/v1/catalog/offerings", params={"gpu": "H100", "cloud": "aws,gcp", "spot": False}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == len(want) > 0
    got = [(o["cloud"], o["region"], o["instance_type"]) for o in body["offerings"]]
    assert got == [(o.cloud, o.region, o.instance_type) for o in want[:100]]
    prices = [o["price"] for o in body["offerings"]]
    assert prices == sorted(prices)


def test_offerings_paging_and_price_cap(client: TestClient) -> None:
    everything = client.get("/v1/catalog/offerings", params={"limit": 10_000}).json()
    assert everything["total"] == len(everything["offerings"]) == len(load_catalog().offerings)
    page = client.get("/v1/catalog/offerings", params={"limit": 5, "offset": 5}).json()
    assert page["offerings"] == everything["offerings"][5:10]
    cheap = client.get("/v1/catalog/offerings", params={"max_price": 1.0, "spot": True}).json()
    assert cheap["total"] > 0
    assert all(o["spot_price"] <= 1.0 for o in cheap["offerings"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_price": -1}, "max_price"),
        ({"max_price": "cheap"}, "max_price"),
        ({"spot": "maybe"}, "spot"),
        ({"limit": 0}, "limit"),
        ({"min_gpu_count": 0}, "min_gpu_count"),
    ],
)
def test_offerings_bad_filters_name_the_field(client: TestClient, params: dict, field: str) -> None:
    err = _error(client.get("/v1/catalog/offerings", params=params), 422, "invalid_request", field)
    assert field in err["message"]
    assert err["errors"][0]["field"] == field


def test_gpus(client: TestClient) -> None:
    gpus = {g["name"]: g for g in client.get("/v1/catalog/gpus").json()["gpus"]}
    assert gpus["H100"]["memory_gib"] == 80
    assert set(gpus) == set(load_catalog().gpus)


# ---------------------------------------------------------------- deployments: unknown names


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/deployments/nope"),
        ("DELETE", "/v1/deployments/nope"),
        ("GET", "/v1/deployments/nope/logs"),
        ("GET", "/v1/deployments/nope/key"),
    ],
)
def test_unknown_deployment_is_404(client: TestClient, method: str, path: str) -> None:
    err = _error(client.request(method, path), 404, "not_found", "name")
    assert "'nope'" in err["message"]


def test_empty_deployment_list(client: TestClient) -> None:
    assert client.get("/v1/deployments").json() == {"deployments": []}


# ---------------------------------------------------------------- spec bodies that never parse


@pytest.mark.parametrize(
    ("body", "ctype", "words"),
    [
        (b"", "application/yaml", "empty"),
        (b"name: [unclosed", "application/yaml", "not valid YAML"),
        (b"{bad json", "application/json", "not valid JSON"),
        (b"- a\n- b\n", "application/yaml", "must be a mapping"),
        (b"42", "application/json", "must be a mapping"),
        (b"\xff\xfe", "application/yaml", "UTF-8"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/plans", "/v1/deployments"])
def test_unparsable_specs_are_400(
    client: TestClient, path: str, body: bytes, ctype: str, words: str
) -> None:
    err = _error(
        client.post(path, content=body, headers={"Content-Type": ctype}), 400, "invalid_spec"
    )
    assert words in err["message"]


def test_infra_query_is_validated(client: TestClient) -> None:
    r = client.post("/v1/plans", params={"infra": "moon"}, content=b"name: x\n")
    _error(r, 422, "invalid_request", "infra")


# ---------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def secured(controller: Controller) -> TestClient:
    return TestClient(create_app(controller, token=TOKEN))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/deployments"),
        ("GET", "/v1/deployments/x"),
        ("DELETE", "/v1/deployments/x"),
        ("GET", "/v1/deployments/x/logs"),
        ("POST", "/v1/plans"),
        ("POST", "/v1/deployments"),
        ("GET", "/v1/catalog/offerings"),
        ("GET", "/v1/catalog/gpus"),
    ],
)
def test_every_v1_route_needs_the_token(secured: TestClient, method: str, path: str) -> None:
    r = secured.request(method, path)
    err = _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in r.text
    wrong = secured.request(method, path, headers={"Authorization": "Bearer " + TOKEN[:-1]})
    _error(wrong, 401, "unauthorized")
    assert "token" in err["message"]


def test_right_token_passes_and_health_stays_open(secured: TestClient) -> None:
    ok = secured.get("/v1/catalog/gpus", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert secured.get("/health").status_code == 200
    assert secured.get("/openapi.json").status_code == 200
    basic = secured.get("/v1/catalog/gpus", headers={"Authorization": f"Basic {TOKEN}"})
    _error(basic, 401, "unauthorized")


def test_openapi_declares_bearer_auth(secured: TestClient) -> None:
    schema = secured.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# ---------------------------------------------------------------- specs that parse but are invalid

GOOD = {
    "name": "chat",
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "workload": {"rate": 1, "input_tokens": 64, "output_tokens": 16},
}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"slo": {"ttft_ms": -5}}, "slo.ttft_ms", "greater than 0"),
        ({"modle": "x"}, "modle", "unknown field"),
        ({"workload": None}, "workload", ""),
        ({"name": "Bad Name"}, "name", "pattern"),
        ({"constraints": {"clouds": ["moon"]}}, "constraints.clouds", "unknown cloud 'moon'"),
        ({"infra": "moon"}, "infra", "local"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/plans", "/v1/deployments"])
def test_invalid_specs_are_422_naming_the_field(
    client: TestClient, path: str, change: dict, field: str, words: str
) -> None:
    spec = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    err = _error(client.post(path, json=spec), 422, "invalid_spec", field)
    assert words in err["message"]
    assert field in err["message"]  # the person-facing message names it too
    yaml_body = yaml.safe_dump(spec).encode()
    r = client.post(path, content=yaml_body, headers={"Content-Type": "application/yaml"})
    _error(r, 422, "invalid_spec", field)


# ---------------------------------------------------------------- plans

TINY = {
    "name": "tiny",
    "infra": "local",
    "model": {
        "name": "tiny-llama",
        "architecture": {
            "num_layers": 2,
            "hidden_size": 64,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 256,
            "max_position_embeddings": 256,
        },
    },
    "workload": {"rate": 0.5, "input_tokens": 16, "output_tokens": 8},
    "slo": {"ttft_ms": 5000, "tpot_ms": 1000, "percentile": 90},
    "engine": {"max_model_len": 128, "max_num_seqs": 4, "kv_cache_gib": 0.1},
}


def test_plan_from_yaml_and_json_agree(client: TestClient) -> None:
    r = client.post(
        "/v1/plans", content=yaml.safe_dump(TINY), headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["name"], body["infra"]) == ("tiny", "local")
    plan = body["plan"]
    assert [(p["cloud"], p["instance_type"]) for p in plan["placements"]] == [
        ("local", "localhost")
    ]
    assert plan["cost_per_hour"] == 0.0 and plan["solver"]["status"]
    as_json = client.post("/v1/plans", json=TINY).json()["plan"]
    assert as_json["placements"] == plan["placements"]


def test_plan_infra_override_plans_on_clouds_with_baselines(client: TestClient) -> None:
    spec = {**TINY, "constraints": {"clouds": ["aws"], "gpus": ["T4"]}}
    r = client.post("/v1/plans", params={"infra": "skypilot"}, json=spec)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["infra"] == "skypilot"
    placements = body["plan"]["placements"]
    assert placements and all(p["cloud"] == "aws" and p["gpu"] == "T4" for p in placements)
    baselines = body["plan"]["baselines"]
    assert set(baselines) >= {"cheapest_single_gpu", "skypilot"}
    cheapest_baseline = min(c for c in baselines.values() if c is not None)
    assert body["plan"]["cost_per_hour"] <= cheapest_baseline + 1e-3  # to_dict rounds to 4 places


def test_infeasible_plan_is_422_with_the_reason(client: TestClient) -> None:
    spec = {**TINY, "slo": {"ttft_ms": 0.01, "tpot_ms": 0.001}}
    err = _error(client.post("/v1/plans", json=spec), 422, "infeasible")
    assert "SLO" in err["message"]  # the planner says why


# ---------------------------------------------------------------- deployments: lifecycle


def test_deployment_lifecycle(client: TestClient, controller: Controller) -> None:
    r = client.post("/v1/deployments", json=TINY)
    assert r.status_code == 202, r.text
    dep = r.json()
    assert (dep["id"], dep["name"], dep["infra"]) == ("tiny", "tiny", "local")
    assert dep["status"] == "PROVISIONING"
    assert (dep["desired_replicas"], dep["ready_replicas"]) == (1, 0)
    assert dep["endpoint"].startswith("http://127.0.0.1:") and dep["endpoint"].endswith("/v1")
    assert dep["planned_cost_per_hour"] == 0.0
    # The endpoint's key: in the launch's answer, and again on asking; the router wants it.
    assert dep["api_key"].startswith("sk-") and dep["api_key"] == controller.api_key("tiny")
    key = client.get("/v1/deployments/tiny/key").json()
    assert key == {"name": "tiny", "endpoint": dep["endpoint"], "api_key": dep["api_key"]}
    assert "api_key" not in client.get("/v1/deployments/tiny").json()
    import httpx

    assert httpx.get(dep["endpoint"] + "/models", timeout=5).status_code == 401
    auth = {"Authorization": f"Bearer {dep['api_key']}"}
    none_ready = httpx.get(dep["endpoint"] + "/models", headers=auth, timeout=5)
    assert none_ready.status_code == 503  # authorized; no replica is ready yet

    again = client.post("/v1/deployments", json=TINY)
    assert "skybroker down tiny" in _error(again, 409, "conflict", "name")["message"]

    listed = client.get("/v1/deployments").json()["deployments"]
    assert [d["name"] for d in listed] == ["tiny"]

    detail = client.get("/v1/deployments/tiny").json()
    assert [r["status"] for r in detail["replicas"]] == ["PENDING"]
    assert detail["replicas"][0]["healthy"] is False
    assert detail["events"][0]["kind"] == "created"
    assert detail["plan"]["placements"][0]["instance_type"] == "localhost"
    assert detail["spec"]["name"] == "tiny"
    assert client.get("/v1/deployments/tiny", params={"events": 0}).json()["events"] == []

    logs = client.get("/v1/deployments/tiny/logs")
    assert logs.status_code == 200 and logs.json()["text"] == ""  # not launched yet
    _error(
        client.get("/v1/deployments/tiny/logs", params={"replica": 3}), 404, "not_found", "replica"
    )

    gone = client.delete("/v1/deployments/tiny")
    assert gone.status_code == 200 and gone.json()["status"] == "DELETED"
    assert controller.get("tiny") is None
    _error(client.get("/v1/deployments/tiny"), 404, "not_found", "name")
    _error(client.delete("/v1/deployments/tiny"), 404, "not_found", "name")


def test_health_counts_deployments(client: TestClient) -> None:
    assert client.post("/v1/deployments", json=TINY).status_code == 202
    assert client.get("/health").json()["deployments"] == 1
    assert client.delete("/v1/deployments/tiny").status_code == 200


def test_dry_run_answers_what_would_launch_and_launches_nothing(
    client: TestClient, controller: Controller
) -> None:
    r = client.post("/v1/deployments", params={"dry_run": "true"}, json=TINY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dry_run"] is True and body["name"] == "tiny"
    assert [x["key"][0] for x in body["replicas"]] == ["local"]
    assert controller.list() == []


def test_infeasible_launch_records_nothing(client: TestClient, controller: Controller) -> None:
    spec = {**TINY, "slo": {"ttft_ms": 0.01, "tpot_ms": 0.001}}
    _error(client.post("/v1/deployments", json=spec), 422, "infeasible")
    assert controller.list() == []


def test_unusable_provisioner_is_502_naming_the_fix_and_records_nothing(
    client: TestClient, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """infra skypilot without SkyPilot installed: nothing is written, the error says how."""
    hide_skypilot(monkeypatch)
    monkeypatch.delitem(controller.provisioners, "skypilot", raising=False)
    spec = {**TINY, "constraints": {"clouds": ["aws"], "gpus": ["T4"]}}
    r = client.post("/v1/deployments", params={"infra": "skypilot"}, json=spec)
    err = _error(r, 502, "provisioner_error")
    assert "pip install 'skybroker[cloud]'" in err["message"]
    assert controller.list() == [] and controller.get("tiny") is None


def test_deployment_detail_shows_failures_in_a_row(
    client: TestClient, controller: Controller
) -> None:
    assert client.post("/v1/deployments", json=TINY).status_code == 202
    try:
        controller._count_failure(controller.get("tiny"), "replica tiny-1 died; exit code 1")
        detail = client.get("/v1/deployments/tiny").json()
        assert detail["failures"] == 1 and 0 < detail["next_launch_in_s"] <= 2.0
        assert detail["events"][-1]["kind"] == "backoff"
    finally:
        client.delete("/v1/deployments/tiny")
