"""SkyPilot offline for tests: its state in a temp HOME, its catalogs seeded, its real API
server and a moto server (the AWS endpoint) on 127.0.0.1, and no way out to the internet.

Catalogs are written in the files and columns SkyPilot 0.14 reads under
$SKY_RUNTIME_DIR/.sky/catalogs/v8/: aws (vms, images, instance_quota_mapping: the bundled
catalog's us-east-1 rows), runpod (vms: all the bundled RunPod rows) and common
(accelerators, metadata), so the offerings the planner picks there are in SkyPilot's too. HTTP(S) proxies point at a closed local port
with 127.0.0.1 exempt, so anything SkyPilot fetches from the internet fails at once instead
of hanging; pip builds SkyPilot's own wheel without an index (no build isolation).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from skybroker.provision import ReplicaSpec
from skybroker.provision.local import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# moto's bundled Ubuntu AMI (moto/ec2/resources/amis.json.gz): SkyPilot's default image
# tags resolve to it, and moto's RunInstances accepts it.
AMI = "ami-1e749f67"
AWS_REGION, AWS_ZONE_ID = "us-east-1", "use1-az1"  # moto maps the zone id to us-east-1b
RUNPOD_KEY = "rp_test_key"
PROFILE = "skybroker-test-profile"  # the instance profile replicas get (aws.remote_identity)


def hide_skypilot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make SkyPilot read as not installed until `monkeypatch` undoes it: `sky` and every
    `sky.*` module are None in sys.modules. Hiding `sky` alone is not enough once a test in
    the same process imported SkyPilot: `from sky.client import sdk` then finds the cached
    `sky.client` and never looks at `sky`."""
    loaded = [name for name in sys.modules if name.startswith("sky.")]
    for name in ["sky", "sky.client", *loaded]:
        monkeypatch.setitem(sys.modules, name, None)


def replica_spec(**kw: Any) -> ReplicaSpec:
    """A one-GPU spot replica of the 8B model on AWS us-east-1 (g5.xlarge), `kw` overriding."""
    base: dict[str, Any] = dict(
        name="demo-12",
        deployment="demo",
        model="meta-llama/Llama-3.1-8B-Instruct",
        served_model_name="llama",
        cloud="aws",
        region="us-east-1",
        instance_type="g5.xlarge",
        spot=True,
        gpu="A10G",
        gpu_count=1,
        secrets={"HF_TOKEN": "hf_secret_value"},
    )
    return ReplicaSpec(**{**base, **kw})


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _gpu_info(name: str, count: int, mem_gib: float) -> str:
    mib = int(mem_gib * 1024)
    return (
        f"{{'Gpus': [{{'Name': '{name}', 'Manufacturer': 'NVIDIA', 'Count': {count}, "
        f"'MemoryInfo': {{'SizeInMiB': {mib}}}}}], 'TotalGpuMemoryInMiB': {mib * count}}}"
    )


def seed_catalogs(home: Path) -> Path:
    """Write SkyPilot's catalog files under `home`; returns the versioned catalog dir."""
    root = home / ".sky" / "catalogs" / "v8"
    with (ROOT / "catalogs" / "offerings.csv").open() as f:
        bundled = list(csv.DictReader(f))
    aws = [r for r in bundled if r["cloud"] == "aws" and r["region"] == AWS_REGION]
    runpod = [r for r in bundled if r["cloud"] == "runpod"]
    aws_header = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone,Arch"
    _write_csv(
        root / "aws" / "vms.csv",
        aws_header.split(","),
        [
            [
                r["instance_type"],
                r["gpu"],
                r["gpu_count"],
                r["vcpus"],
                r["memory_gib"],
                _gpu_info(r["gpu"], int(r["gpu_count"]), float(r["gpu_memory_gib"] or 0)),
                r["price"],
                r["spot_price"],
                AWS_REGION,
                AWS_ZONE_ID,
                "x86_64",
            ]
            for r in aws
        ],
    )
    tags = ["skypilot:custom-gpu-ubuntu-cuda13", "skypilot:custom-cpu-ubuntu"]
    _write_csv(
        root / "aws" / "images.csv",
        ["Tag", "Region", "OS", "OSVersion", "ImageId", "CreationDate"],
        [[t, AWS_REGION, "ubuntu", "22.04", AMI, "20260101"] for t in tags],
    )
    _write_csv(
        root / "aws" / "instance_quota_mapping.csv",
        ["InstanceType", "OnDemandInstanceCode", "SpotInstanceCode"],
        [[r["instance_type"], "L-DB2E81BA", "L-3819A6DF"] for r in aws],
    )
    _write_csv(
        root / "runpod" / "vms.csv",
        [
            "InstanceType",
            "AcceleratorName",
            "AcceleratorCount",
            "vCPUs",
            "MemoryGiB",
            "Region",
            "SpotPrice",
            "Price",
            "AvailabilityZone",
            "GpuInfo",
        ],
        [
            [
                r["instance_type"],
                r["gpu"],
                float(r["gpu_count"]),
                float(r["vcpus"]),
                float(r["memory_gib"]),
                r["region"],
                r["spot_price"],
                r["price"],
                f"{r['region']}-1",
                _gpu_info(r["gpu"], int(r["gpu_count"]), float(r["gpu_memory_gib"] or 0)),
            ]
            for r in runpod
        ],
    )
    with (ROOT / "catalogs" / "gpus.csv").open() as f:
        gpus = {r["name"]: r for r in csv.DictReader(f)}
    names = sorted({r["gpu"] for r in aws + runpod if r["gpu"]})
    clouds: dict[str, set[str]] = {g: set() for g in names}
    for r in aws + runpod:
        if r["gpu"]:
            clouds[r["gpu"]].add("AWS" if r["cloud"] == "aws" else "RunPod")
    _write_csv(
        root / "common" / "accelerators.csv",
        ["AcceleratorName", "Clouds"],
        [[g, str(sorted(c))] for g, c in clouds.items()],
    )
    _write_csv(
        root / "common" / "metadata.csv",
        ["GPU", "MemoryGB", "Manufacturer"],
        [[g, (gpus.get(g) or {}).get("memory_gib", ""), "NVIDIA"] for g in names],
    )
    return root


def sky_env(home: Path, api_port: int, moto_url: str | None) -> dict[str, str]:
    """The environment of SkyPilot's client and server: nothing of the real user's HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "SKYPILOT_", "SKY_")) and k.lower() not in _PROXY_VARS
    }
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: outside requests fail fast
    env.update(
        HOME=str(home),
        SKY_RUNTIME_DIR=str(home),
        SKYPILOT_API_SERVER_LOCAL_PORT=str(api_port),
        SKYPILOT_DISABLE_USAGE_COLLECTION="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        PIP_NO_BUILD_ISOLATION="0",
        PIP_NO_INDEX="1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        SKYBROKER_HOME=str(home / "skybroker"),
    )
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = closed
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    if moto_url:
        env["AWS_ENDPOINT_URL"] = moto_url
    return env


_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass
class SkyServers:
    home: Path
    env: dict[str, str]
    api_url: str
    moto_url: str
    procs: list[subprocess.Popen]

    def ec2(self):  # -> boto3 EC2 client on moto
        import boto3

        return boto3.client(
            "ec2",
            region_name="us-east-1",
            endpoint_url=self.moto_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def instances(self) -> list[dict]:
        out = []
        for r in self.ec2().describe_instances()["Reservations"]:
            out += r["Instances"]
        return out


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code < 500:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f}s: {log.read_text()[-3000:]}")


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (the API server's workers too), SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _prepare_aws(servers: SkyServers) -> None:
    """What an AWS account has before SkyPilot runs: a default VPC whose subnets route to an
    internet gateway, and an instance profile for the replicas (aws.remote_identity)."""
    import boto3

    ec2 = servers.ec2()
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc["VpcId"])
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])
    for table in tables["RouteTables"]:
        ec2.create_route(
            RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw
        )
    iam = boto3.client(
        "iam",
        region_name="us-east-1",
        endpoint_url=servers.moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iam.create_instance_profile(InstanceProfileName=PROFILE)


class RunPodAPI:
    """RunPod's GraphQL endpoint as `sky check runpod` uses it (RUNPOD_API_BASE_URL): the
    account's pod list, empty; a wrong key is refused, any other query is an error."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"]
                api.queries.append(query)
                if self.headers.get("Authorization") != f"Bearer {RUNPOD_KEY}":
                    self._send(401, {})
                elif "query myPods" in query:
                    self._send(200, {"data": {"myself": {"pods": []}}})
                else:
                    self._send(200, {"errors": [{"message": "not served by the stand-in"}]})

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def sky_servers(tmp: Path) -> Iterator[SkyServers]:
    """moto + SkyPilot's API server, state under `tmp`; both stopped (process groups) after."""
    home = tmp / "home"
    home.mkdir(parents=True)
    seed_catalogs(home)
    (home / ".sky" / "config.yaml").write_text(f"aws:\n  remote_identity: {PROFILE}\n")
    (home / ".runpod").mkdir()
    (home / ".runpod" / "config.toml").write_text(f'[default]\napi_key = "{RUNPOD_KEY}"\n')
    moto_port, api_port = free_port(), free_port()
    moto_url = f"http://127.0.0.1:{moto_port}"
    runpod = RunPodAPI()
    env = {**sky_env(home, api_port, moto_url), "RUNPOD_API_BASE_URL": runpod.url}
    procs: list[subprocess.Popen] = []
    try:
        moto_env = {**env, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}
        moto = _start(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
            moto_env,
            tmp / "moto.log",
            tmp,
        )
        procs.append(moto)
        _wait_http(f"{moto_url}/moto-api/", moto, 60, tmp / "moto.log")
        api = _start(
            [
                sys.executable,
                "-m",
                "sky.server.server",
                "--host=127.0.0.1",
                f"--port={api_port}",
            ],
            env,
            tmp / "api.log",
            tmp,
        )
        procs.append(api)
        api_url = f"http://127.0.0.1:{api_port}"
        _wait_http(f"{api_url}/api/health", api, 180, tmp / "api.log")
        servers = SkyServers(home, env, api_url, moto_url, procs)
        _prepare_aws(servers)
        yield servers
    finally:
        for proc in reversed(procs):
            _stop(proc)
        runpod.close()
