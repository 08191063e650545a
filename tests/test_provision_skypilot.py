"""The SkyPilot provisioner at the SDK boundary, with SkyPilot isolated offline.

No cloud can be reached here, so the tests check what crosses the boundary: the Task and
Resources built (golden YAML from `to_yaml_config()`), the SDK calls made (recording fakes of
sky.launch / stream_and_get / get / status / endpoints / down), and the mapping of each
SkyPilot exception to the broker's errors. SkyPilot reads seeded catalog files under a temp
SKY_RUNTIME_DIR and every socket connect is refused, so nothing can hang on a download.
Importing SkyPilot takes tens of seconds on a busy 2-core box, hence `slow`.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from skybroker.provision import (
    CapacityError,
    CredentialsError,
    MissingExtraError,
    NoCloudAccessError,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
)
from skybroker.provision.skypilot import SkyPilotProvisioner, cluster_name, import_sky

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

AWS_VMS = """\
InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone
g5.xlarge,A10G,1,4,16,,1.006,0.4,us-east-1,use1-az1
g5.xlarge,A10G,1,4,16,,1.006,0.45,us-west-2,usw2-az1
g5.12xlarge,A10G,4,48,192,,5.672,2.1,us-east-1,use1-az1
"""


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """SkyPilot imported with its runtime dir in a temp dir holding seeded AWS catalogs."""
    root = tmp_path_factory.mktemp("skyruntime")
    catalogs = root / ".sky" / "catalogs" / "v8" / "aws"
    catalogs.mkdir(parents=True)
    (catalogs / "vms.csv").write_text(AWS_VMS)
    (catalogs / "images.csv").write_text("Tag,Region,OS,OSVersion,ImageId,CreationDate\n")
    (catalogs / "instance_quota_mapping.csv").write_text("InstanceType,Quota\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("SKY_RUNTIME_DIR", str(root))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(root / "no-aws-credentials"))
    mp.setenv("AWS_CONFIG_FILE", str(root / "no-aws-config"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(f"network disabled in tests: {args[1:] if len(args) > 1 else args}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    sky = import_sky()
    from sky.catalog import common

    mp.setattr(common, "_ABSOLUTE_VERSIONED_CATALOG_DIR", str(root / ".sky/catalogs/v8"))
    yield sky
    mp.undo()


class FakeSDK:
    """Records SDK calls; each call returns a request id that `get`/`stream_and_get` resolve."""

    def __init__(self, sky: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sky = sky
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        for name in ("launch", "status", "endpoints", "down", "tail_logs", "check"):
            monkeypatch.setattr(sky, name, self._recorder(name))
        monkeypatch.setattr(sky, "get", self._resolve)
        monkeypatch.setattr(sky, "stream_and_get", self._stream_and_get)

    def _recorder(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> str:
            self.calls.append((name, args, kwargs))
            return f"req-{name}"

        return call

    def _resolve(self, request_id: str) -> Any:
        name = request_id.removeprefix("req-")
        if name in self.errors:
            raise self.errors[name]
        return self.results.get(name)

    def _stream_and_get(self, request_id: str, **kwargs: Any) -> Any:
        self.calls.append(("stream_and_get", (request_id,), kwargs))
        return self._resolve(request_id)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def fake(sky, monkeypatch) -> FakeSDK:
    f = FakeSDK(sky, monkeypatch)
    f.results["launch"] = (1, object())
    f.results["endpoints"] = {8000: "3.3.3.3:8000"}
    return f


def _spec(**kw: Any) -> ReplicaSpec:
    base = dict(
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
        engine_args={"max_model_len": 4096},
        envs={"SKYBROKER_LOG": "info"},
        secrets={"HF_TOKEN": "hf_secret_value"},
    )
    base.update(kw)
    return ReplicaSpec(**base)  # type: ignore[arg-type]


def test_cluster_names_are_valid() -> None:
    assert cluster_name("demo-12") == "sb-demo-12"
    assert cluster_name("My_Deploy.v2-3") == "sb-my-deploy-v2-3"
    assert len(cluster_name("x" * 200)) <= 60


def test_golden_task_yaml_for_hub_model(sky) -> None:
    prov = SkyPilotProvisioner(workdir=False)
    config = prov.build_task(_spec()).to_yaml_config()
    assert "HF_TOKEN" not in config["envs"]  # secrets travel as SkyPilot secrets only
    assert config == {
        "name": "sb-demo-12",
        "setup": "pip install -q 'skybroker[engine,gpu]==0.1.0'",
        "run": "python -m engine.serve --model meta-llama/Llama-3.1-8B-Instruct "
        "--served-model-name llama --host 0.0.0.0 --port 8000 --max-model-len 4096",
        "envs": {"SKYBROKER_LOG": "info"},
        "secrets": {"HF_TOKEN": "hf_secret_value"},
        "num_nodes": 1,
        "file_mounts": {},
        "volumes": {},
        "resources": {
            "infra": "aws/us-east-1",
            "instance_type": "g5.xlarge",
            "accelerators": {"A10G": 1},
            "use_spot": True,
            "ports": ["8000"],
            "memory": "16.0",
        },
    }


def test_task_for_local_model_dir_and_gguf_uses_file_mounts_and_workdir(sky, tmp_path) -> None:
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    gguf = tmp_path / "smollm2.gguf"
    gguf.write_bytes(b"GGUF")
    prov = SkyPilotProvisioner(workdir=tmp_path)
    task = prov.build_task(
        _spec(
            model=str(model_dir),
            tensor_parallel_size=4,
            instance_type="g5.12xlarge",
            gpu_count=4,
            spot=False,
        )
    )
    config = task.to_yaml_config()
    assert config["file_mounts"] == {"/skybroker/model": str(model_dir)}
    assert config["workdir"] == str(tmp_path)
    assert config["setup"] == "pip install -q -e '.[engine,gpu]'"
    assert "--model /skybroker/model " in config["run"]
    assert "--tensor-parallel-size 4" in config["run"]
    assert config["resources"]["instance_type"] == "g5.12xlarge"
    assert config["resources"]["use_spot"] is False  # pinned to on-demand
    config = prov.build_task(_spec(model=str(gguf))).to_yaml_config()
    assert config["file_mounts"] == {"/skybroker/model/smollm2.gguf": str(gguf)}
    assert "--model /skybroker/model/smollm2.gguf" in config["run"]


def test_resources_are_pinned(sky) -> None:
    res = SkyPilotProvisioner().build_resources(_spec(region="us-west-2"))
    assert str(res.cloud) == "AWS"
    assert res.region == "us-west-2"
    assert res.instance_type == "g5.xlarge"
    assert res.use_spot is True
    assert res.ports == ["8000"]
    with pytest.raises(ProvisionError, match="use infra: local"):
        SkyPilotProvisioner().build_resources(_spec(cloud="local"))


def test_launch_makes_the_sdk_calls_and_returns_the_endpoint(sky, fake) -> None:
    prov = SkyPilotProvisioner(workdir=False, idle_minutes_to_autostop=30)
    handle = prov.launch(_spec())
    assert fake.names() == ["launch", "stream_and_get", "endpoints"]
    _, args, kwargs = fake.calls[0]
    assert isinstance(args[0], sky.Task)
    assert kwargs == {
        "cluster_name": "sb-demo-12",
        "retry_until_up": False,
        "idle_minutes_to_autostop": 30,
    }
    assert fake.calls[1][1] == ("req-launch",)
    assert fake.calls[2][1] == ("sb-demo-12", 8000)
    assert handle.url == "http://3.3.3.3:8000"
    assert handle.info == {"cluster": "sb-demo-12", "job_id": 1, "port": 8000}
    assert "hf_secret_value" not in str(handle.to_dict())


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("UP", ReplicaState.RUNNING),
        ("INIT", ReplicaState.LAUNCHING),
        ("STOPPED", ReplicaState.PREEMPTED),
    ],
)
def test_status_maps_cluster_status(sky, fake, status, state) -> None:
    fake.results["status"] = [{"name": "sb-demo-12", "status": sky.ClusterStatus(status)}]
    prov = SkyPilotProvisioner()
    assert prov.status(ReplicaHandle(provider="skypilot", name="demo-12")) == state
    name, args, kwargs = fake.calls[0]
    assert (name, args, kwargs) == (
        "status",
        (["sb-demo-12"],),
        {"refresh": sky.StatusRefreshMode.AUTO},
    )


def test_status_of_a_vanished_cluster_is_dead(sky, fake) -> None:
    fake.results["status"] = []
    assert SkyPilotProvisioner().status(ReplicaHandle("skypilot", "demo-12")) == ReplicaState.DEAD


def test_terminate_downs_by_name_and_tolerates_missing_cluster(sky, fake) -> None:
    prov = SkyPilotProvisioner()
    prov.terminate(ReplicaHandle("skypilot", "demo-12"))
    assert fake.calls[0][:2] == ("down", ("sb-demo-12",))
    fake.errors["down"] = sky.exceptions.ClusterDoesNotExist("no such cluster")
    prov.terminate(ReplicaHandle("skypilot", "demo-12"))  # twice is fine


def test_capacity_error_carries_offering_key_and_failover_history(sky, fake) -> None:
    sx = sky.exceptions
    fake.errors["launch"] = sx.ResourcesUnavailableError(
        "Failed to provision all possible launchable resources.",
        failover_history=[sx.ResourcesUnavailableError("InsufficientInstanceCapacity in use1-az1")],
    )
    with pytest.raises(CapacityError) as info:
        SkyPilotProvisioner().launch(_spec())
    assert info.value.offering_key == ("aws", "us-east-1", "g5.xlarge", True)
    assert "InsufficientInstanceCapacity in use1-az1" in str(info.value)
    assert "demo-12 on aws/us-east-1/g5.xlarge/True" in str(info.value)


def test_no_launchable_resources_is_a_capacity_error_too(sky, fake) -> None:
    fake.errors["launch"] = sky.exceptions.ResourcesUnavailableError("No launchable resource found")
    with pytest.raises(CapacityError, match="No launchable resource found"):
        SkyPilotProvisioner().launch(_spec())


def test_credential_failures_are_credentials_errors(sky, fake) -> None:
    sx = sky.exceptions
    fake.errors["launch"] = sx.ResourcesUnavailableError(
        "failed", failover_history=[sx.InvalidCloudCredentials("AWS credentials expired")]
    )
    with pytest.raises(CredentialsError, match="AWS credentials expired"):
        SkyPilotProvisioner().launch(_spec())
    fake.errors["launch"] = sx.CloudUserIdentityError("cannot get identity")
    with pytest.raises(CredentialsError, match="cannot get identity"):
        SkyPilotProvisioner().launch(_spec())


def test_no_cloud_access_and_other_errors(sky, fake) -> None:
    sx = sky.exceptions
    fake.errors["launch"] = sx.NoCloudAccessError("Cloud access is not set up.")
    with pytest.raises(NoCloudAccessError, match="sky check"):
        SkyPilotProvisioner().launch(_spec())
    fake.errors["launch"] = sx.ApiServerConnectionError("http://127.0.0.1:46580")
    with pytest.raises(ProvisionError, match="cannot reach the SkyPilot API server"):
        SkyPilotProvisioner().launch(_spec())
    fake.errors["launch"] = RuntimeError("boom")
    with pytest.raises(ProvisionError, match="RuntimeError: boom"):
        SkyPilotProvisioner().launch(_spec())


def test_endpoint_missing_is_clear(sky, fake) -> None:
    fake.results["endpoints"] = {}
    with pytest.raises(ProvisionError, match="no endpoint for port 8000"):
        SkyPilotProvisioner().endpoint(ReplicaHandle("skypilot", "demo-12", info={"port": 8000}))


def test_missing_sky_is_a_missing_extra_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sky", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'skybroker\[cloud\]'"):
        SkyPilotProvisioner().launch(_spec())


def test_project_root_is_this_checkout() -> None:
    from skybroker.provision.skypilot import project_root

    root = project_root()
    assert root is not None and (root / "engine").is_dir()
    assert Path(root / "pyproject.toml").exists()


def test_golden_task_yaml_for_data_parallel_spot_placement(sky) -> None:
    """A placement of 2 engines x TP 2 on a 4-GPU spot instance: one engine per GPU pair and
    port, every port exposed, GPUs and market pinned."""
    prov = SkyPilotProvisioner(workdir=False)
    spec = _spec(
        instance_type="g5.12xlarge",
        gpu_count=4,
        tensor_parallel_size=2,
        data_parallel=2,
        secrets={},
        envs={},
    )
    config = prov.build_task(spec).to_yaml_config()
    engine = (
        "python -m engine.serve --model meta-llama/Llama-3.1-8B-Instruct "
        "--served-model-name llama --host 0.0.0.0 --port {port} --tensor-parallel-size 2 "
        "--max-model-len 4096"
    )
    assert config == {
        "name": "sb-demo-12",
        "setup": "pip install -q 'skybroker[engine,gpu]==0.1.0'",
        "run": f"CUDA_VISIBLE_DEVICES=0,1 {engine.format(port=8000)} &\n"
        f"CUDA_VISIBLE_DEVICES=2,3 {engine.format(port=8001)} &\nwait",
        "num_nodes": 1,
        "file_mounts": {},
        "volumes": {},
        "resources": {
            "infra": "aws/us-east-1",
            "instance_type": "g5.12xlarge",
            "accelerators": {"A10G": 4},
            "use_spot": True,
            "ports": ["8000-8001"],  # SkyPilot folds consecutive ports into a range
            "memory": "192.0",
        },
    }


def test_golden_task_yaml_pins_gpus_of_an_on_demand_tp_placement(sky) -> None:
    spec = _spec(
        instance_type="g5.12xlarge", gpu_count=4, tensor_parallel_size=4, spot=False, secrets={}
    )
    res = SkyPilotProvisioner(workdir=False).build_task(spec).to_yaml_config()["resources"]
    assert res["accelerators"] == {"A10G": 4} and res["use_spot"] is False
    assert res["ports"] == ["8000"]


def test_placement_needing_more_gpus_than_the_instance_has_is_refused(sky) -> None:
    spec = _spec(gpu_count=1, tensor_parallel_size=2, data_parallel=1)
    with pytest.raises(ProvisionError, match=r"need 2 GPUs, but g5.xlarge has 1"):
        SkyPilotProvisioner().build_resources(spec)


def test_data_parallel_launch_returns_one_url_per_engine(sky, fake) -> None:
    fake.results["endpoints"] = {8000: "3.3.3.3:8000", 8001: "3.3.3.3:8001"}
    spec = _spec(instance_type="g5.12xlarge", gpu_count=4, tensor_parallel_size=2, data_parallel=2)
    handle = SkyPilotProvisioner(workdir=False).launch(spec)
    assert handle.url == "http://3.3.3.3:8000"
    assert handle.info["urls"] == ["http://3.3.3.3:8000", "http://3.3.3.3:8001"]
    assert [c[1] for c in fake.calls if c[0] == "endpoints"] == [
        ("sb-demo-12", 8000),
        ("sb-demo-12", 8000),
        ("sb-demo-12", 8001),
    ]


def test_check_passes_when_sky_check_enables_the_planned_clouds(sky, fake) -> None:
    fake.results["check"] = {"default": {"AWS": ["compute", "storage"], "GCP": ["storage"]}}
    prov = SkyPilotProvisioner()
    prov.check({"aws"})
    assert fake.calls[-1][:2] == ("check", (("aws",),))
    with pytest.raises(CredentialsError, match=r"cannot use gcp .*`sky check gcp`"):
        prov.check({"aws", "gcp"})
    fake.results["check"] = {"default": {}}
    with pytest.raises(NoCloudAccessError, match=r"no cloud enabled.*`sky check aws`"):
        prov.check({"aws"})


def test_check_without_sky_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sky", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'skybroker\[cloud\]'"):
        SkyPilotProvisioner().check({"aws"})
