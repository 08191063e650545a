"""Offerings where SkyPilot cannot open the engine's port are never planned, and what
SkyPilot leaves open (Lambda's account-wide firewall rules) is said in the plan and status.
The catalog is the bundled one; the facts come from SkyPilot 0.14's lambda provisioner,
checked here against its source."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from skybroker.catalog import load_catalog
from skybroker.health import FailureRun
from skybroker.plan import network_notes
from skybroker.plan_problem import allowed_offerings
from skybroker.provision.ports import left_open, port_unreachable
from skybroker.spec import load_spec
from skybroker.views import deployment_view

SPEC = """
name: t
infra: skypilot
model: meta-llama/Llama-3.1-8B-Instruct
workload:
  rate: 1
  input_tokens: {mean: 300, p99: 900}
  output_tokens: {mean: 150, p99: 400}
  users: {us-east: 1.0}
slo: {ttft_ms: 2000, tpot_ms: 80}
constraints: {clouds: [lambda]}
"""


def test_skypilots_lambda_code_still_skips_us_south_1() -> None:
    from sky.provision.lambda_cloud import instance

    open_src = inspect.getsource(instance.open_ports)
    assert "region == 'us-south-1'" in open_src and "return" in open_src
    assert "Skip cleanup of firewall rules" in inspect.getsource(instance.cleanup_ports)


def test_lambda_us_south_1_is_never_planned(tmp_path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    spec = load_spec(path)
    catalog = load_catalog()
    assert any((o.cloud, o.region) == ("lambda", "us-south-1") for o in catalog.offerings)
    rows = allowed_offerings(spec, catalog, frozenset())
    assert rows and all(o.cloud == "lambda" for o, _, _ in rows)
    assert not [o for o, _, _ in rows if o.region == "us-south-1"]
    lambda_placement = SimpleNamespace(offering=SimpleNamespace(cloud="lambda"))
    notes = network_notes(spec, catalog, [lambda_placement])
    assert notes[0].startswith("left out lambda us-south-1: SkyPilot cannot open ports")
    assert "account-wide" in notes[1] and "0.0.0.0/0" in notes[1]
    assert port_unreachable("Lambda", "US-SOUTH-1") and not port_unreachable("aws", "us-east-1")


def test_status_says_what_stays_open() -> None:
    assert left_open(["aws", "gcp"]) == []

    def rep(cloud: str, status: str) -> SimpleNamespace:
        return SimpleNamespace(name=f"r-{cloud}", cloud=cloud, region="x", instance_type="i",
                               spot=False, status=status, url=None, message="", target=0,
                                   handle=None)  # fmt: skip

    dep = SimpleNamespace(name="d", infra="skypilot", status="READY", message="", endpoint=None,
                          spec={}, plan={}, blocklist=[],
                          targets=[{"price_per_hour": 1.0, "replicas": 1}])  # fmt: skip
    view = deployment_view(dep, [rep("lambda", "READY"), rep("aws", "READY")], [], FailureRun())
    assert view["left_open"] == left_open(["lambda"]) and "stay open" in view["left_open"][0]
    gone = deployment_view(dep, [rep("lambda", "TERMINATED")], [], FailureRun())
    assert gone["left_open"] == view["left_open"]  # the rule outlives the replica
    assert deployment_view(dep, [rep("aws", "READY")], [], FailureRun())["left_open"] == []
