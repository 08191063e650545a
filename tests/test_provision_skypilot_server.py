"""The SkyPilot provisioner against SkyPilot's real local API server, offline.

The module starts SkyPilot's API server (state in a temp HOME, seeded catalogs), a moto
server as the AWS endpoint and RunPod's GraphQL stand-in (tests/skypilot_env.py); the
broker's code runs in fresh processes that talk to them (tests/sky_driver.py, the CLI):
`sky check`, `sky status`, `sky down` of a cluster that does not exist, `sky launch --dryrun`
of the broker's Tasks (also `skybroker launch examples/chat-8b-us-eu.yaml --dry-run`), and a
real launch on moto: the EC2 instance has the planned type, zone of the region and market;
SkyPilot then cannot reach it over SSH, the broker's launch timeout fails the launch, and the
controller tears it down (no instance left running).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from skybroker.provision.sky_names import (
    BROKER_LABEL,
    REPLICA_LABEL,
    broker_id,
    cluster_name,
    replica_hash,
)
from tests.skypilot_env import ROOT, SkyServers, replica_spec, sky_servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    with sky_servers(tmp_path_factory.mktemp("sky")) as s:
        yield s


def drive(
    servers: SkyServers, *args: str, timeout: float = 300, home: Path | None = None
) -> dict[str, Any]:
    """Run a sky_driver call; `home`: that broker's SKYBROKER_HOME instead of the default."""
    env = {**servers.env, "SKYBROKER_HOME": str(home)} if home else servers.env
    out = subprocess.run(
        [sys.executable, "-m", "tests.sky_driver", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spec(**kw: Any) -> str:
    base = dict(name="probe-1", deployment="probe", secrets={"HF_TOKEN": "hf_secret"})
    return json.dumps(asdict(replica_spec(**{**base, **kw})))


def test_check_through_the_api_server(servers: SkyServers) -> None:
    assert drive(servers, "check", "aws,runpod") == {"ok": None}
    answer = drive(servers, "check", "aws,gcp")
    assert answer["error"] == "CredentialsError"
    assert "cannot use gcp (enabled: aws" in answer["message"]
    assert "`sky check gcp`" in answer["message"]


def test_status_and_down_of_a_cluster_that_does_not_exist(servers: SkyServers) -> None:
    assert drive(servers, "status", "nothing-here") == {"ok": "DEAD"}
    assert drive(servers, "statuses", "a-1,b-2,c-3") == {
        "ok": dict.fromkeys(["a-1", "b-2", "c-3"], "DEAD")
    }
    assert drive(servers, "terminate", "nothing-here") == {"ok": None}


def test_dry_run_validates_the_task_against_the_catalog(servers: SkyServers) -> None:
    answer = drive(servers, "dry_run", _spec())
    task = answer["ok"]["task"]
    broker = broker_id(servers.home / "skybroker")  # created by the driver's provisioner
    assert answer["ok"]["cluster"] == cluster_name("probe-1", broker)
    assert task["resources"]["infra"] == "aws/us-east-1"
    assert task["resources"]["instance_type"] == "g5.xlarge"
    assert task["resources"]["use_spot"] is True
    # never echoed back: the hub token, and the replica's TLS certificate and key
    masked = dict.fromkeys(("HF_TOKEN", "SKYBROKER_TLS_CERT", "SKYBROKER_TLS_KEY"), "<secret>")
    assert task["secrets"] == masked
    assert "--ssl-keyfile" in task["run"]
    # A region the catalog does not offer the instance in, and GPUs the instance lacks:
    # SkyPilot's own validation refuses them, and the broker names the call and SkyPilot's why.
    answer = drive(servers, "dry_run", _spec(region="eu-west-1"))
    assert answer["error"] == "ProvisionError", answer
    assert answer["message"].startswith("sky launch --dryrun failed for probe-1 on aws/eu-west-1")
    assert "Invalid region 'eu-west-1'" in answer["message"]  # SkyPilot's own words
    answer = drive(servers, "dry_run", _spec(gpu="H100"))
    assert answer["error"] == "ProvisionError", answer
    assert "ResourcesMismatchError" in answer["message"]
    assert "Accelerators for g5.xlarge: {'A10G': 1}" in answer["message"]
    assert servers.instances() == []  # a dry run launches nothing


def test_cli_dry_run_of_the_example(servers: SkyServers, tmp_path: Path) -> None:
    """The example, narrowed to the clouds whose `sky check` runs offline here (moto's AWS,
    the RunPod stand-in): SkyPilot's Lambda and GCP/Azure clients call fixed endpoints."""
    cli = [sys.executable, "-m", "skybroker"]
    data = yaml.safe_load((ROOT / "examples" / "chat-8b-us-eu.yaml").read_text())
    data["constraints"]["clouds"] = ["aws", "runpod"]
    example = tmp_path / "chat-8b-us-eu.yaml"
    example.write_text(yaml.safe_dump(data))
    try:
        out = subprocess.run(
            [*cli, "launch", str(example), "--dry-run"],
            cwd=tmp_path,
            env={**servers.env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        subprocess.run([*cli, "server", "stop"], env=servers.env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    spec = yaml.safe_load(example.read_text())
    assert f"dry run of {spec['name']} (infra: skypilot)" in out.stdout
    assert "SkyPilot validated its Task" in out.stdout
    assert "python -m engine.serve --model meta-llama/Llama-3.1-8B-Instruct" in out.stdout
    assert "nothing was launched" in out.stdout
    assert servers.instances() == []


def _write_spec(path: Path, name: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "infra": "skypilot",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "workload": {
                    "rate": 1,
                    "input_tokens": {"mean": 300, "p50": 200, "p99": 1000},
                    "output_tokens": {"mean": 100, "p50": 80, "p99": 300},
                    "users": {"us-east": 1.0},
                },
                "slo": {"ttft_ms": 3000, "tpot_ms": 200},
                "constraints": {
                    "clouds": ["aws"],
                    "regions": ["us-east-1"],
                    "gpus": ["A10G"],
                    "spot": "prefer",
                },
            }
        )
    )
    return path


def test_launch_on_moto_creates_the_planned_instance_then_tears_it_down(
    servers: SkyServers, tmp_path: Path
) -> None:
    spec = _write_spec(tmp_path / "spec.yaml", "moto-chat")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.sky_driver", "deploy", str(spec), "60"],
        cwd=ROOT,
        env=servers.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        for inst in servers.instances():
            if inst["State"]["Name"] in ("pending", "running"):
                seen[inst["InstanceId"]] = inst
        time.sleep(2)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    answer = json.loads(stdout.strip().splitlines()[-1])["ok"]
    [placement] = answer["plan"]["placements"]
    assert seen, "SkyPilot created no instance in moto"
    for inst in seen.values():
        assert inst["InstanceType"] == placement["instance_type"]
        assert inst["Placement"]["AvailabilityZone"].startswith(placement["region"])
        assert (inst.get("InstanceLifecycle") == "spot") == placement["spot"]
    kinds = [e["kind"] for e in answer["events"]]
    assert "launch_failed" in kinds, answer["events"]
    failed = next(e for e in answer["events"] if e["kind"] == "launch_failed")
    assert "was not up after 60s; cancelled it" in failed["message"]
    assert answer["replicas"][0]["status"] == "FAILED"
    left = [i for i in servers.instances() if i["State"]["Name"] not in ("terminated",)]
    assert left == [], [(i["InstanceId"], i["State"]["Name"]) for i in left]


def _state(servers: SkyServers, instance_id: str) -> str:
    [inst] = [i for i in servers.instances() if i["InstanceId"] == instance_id]
    return inst["State"]["Name"]


def _tags(inst: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


def test_a_broker_killed_mid_launch_leaks_no_cluster_and_a_reclaim_is_a_preemption(
    servers: SkyServers, tmp_path: Path
) -> None:
    """Two brokers (own stores and ids) launch through one SkyPilot API server and are
    SIGKILLed mid-launch. `moto-crash`: the restarted broker's store has lost track of the
    replica (its row TERMINATED); adoption finds the launch request the provisioner recorded,
    cancels it and sweeps the cluster carrying this broker's prefix and labels, leaving the
    other broker's alone. `moto-reclaim`: its launch is cancelled, then the cloud reclaims
    the spot instance; SkyPilot's refresh drops the cluster (`sky.status` lists nothing),
    which a replica that was UP on spot reads as PREEMPTED and on-demand as DEAD. Nothing is
    left running in moto."""
    homes = {name: tmp_path / name for name in ("moto-crash", "moto-reclaim")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tests.sky_driver", "deploy",
             str(_write_spec(tmp_path / f"{name}.yaml", name)), "600"],
            cwd=ROOT, env={**servers.env, "SKYBROKER_HOME": str(home)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for name, home in homes.items()
    }  # fmt: skip
    records = [home / "skypilot" / "launches" for home in homes.values()]
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs.values()), "a broker ended early"
            for inst in servers.instances():
                if inst["State"]["Name"] in ("pending", "running"):
                    seen[inst["InstanceId"]] = inst
            if len(seen) == 2 and all(list(r.glob("*.json")) for r in records):
                break
            time.sleep(1)
    finally:
        for proc in procs.values():
            proc.kill()  # SIGKILL: no cleanup of any kind
            proc.wait(30)
    assert len(seen) == 2, f"SkyPilot created {len(seen)} of 2 instances in moto"
    brokers = {name: broker_id(home) for name, home in homes.items()}
    assert len(set(brokers.values())) == 2  # two brokers, two ids
    assert {_tags(i).get(BROKER_LABEL) for i in seen.values()} == set(brokers.values())

    answer = drive(servers, "adopt", "moto-crash", "1", timeout=400, home=homes["moto-crash"])
    answer = answer["ok"]
    [(cluster, statuses)] = answer["requests"].items()
    assert cluster.startswith(f"sb-{brokers['moto-crash']}-moto-cras"), cluster
    assert statuses == ["CANCELLED"], answer
    assert answer["launch_records_left"] == []
    by_broker = {_tags(i)[BROKER_LABEL]: i["InstanceId"] for i in seen.values()}
    crash_id, reclaim_id = by_broker[brokers["moto-crash"]], by_broker[brokers["moto-reclaim"]]
    assert _state(servers, crash_id) in ("shutting-down", "terminated")  # swept
    assert _state(servers, reclaim_id) in ("pending", "running")  # another broker's: kept

    reclaim = drive(servers, "cancel", "moto-reclaim", home=homes["moto-reclaim"])["ok"]
    assert reclaim["done"].startswith("cancelled launch request"), reclaim
    mine = [i["InstanceId"] for i in seen.values()
            if _tags(i).get(REPLICA_LABEL) == replica_hash(reclaim["replica"])]  # fmt: skip
    assert len(mine) == 1
    servers.ec2().terminate_instances(InstanceIds=mine)  # the cloud reclaims the spot VM
    state = drive(servers, "status_as", reclaim["replica"], "1", "1", home=homes["moto-reclaim"])
    state = state["ok"]
    assert state.startswith("PREEMPTED: spot cluster"), state
    assert "preempted" in state
    state = drive(servers, "status_as", reclaim["replica"], "0", "1", home=homes["moto-reclaim"])
    state = state["ok"]
    assert state.startswith("DEAD: on-demand cluster"), state

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        left = [i for i in servers.instances() if i["State"]["Name"] != "terminated"]
        if not left:
            break
        time.sleep(2)
    assert left == [], [(i["InstanceId"], i["State"]["Name"]) for i in left]
