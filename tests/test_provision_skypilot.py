"""The SkyPilot provisioner with SkyPilot's own code, in this process and offline.

SkyPilot is imported with HOME and SKY_RUNTIME_DIR in a temp dir whose catalogs are seeded
(tests/skypilot_env.py) and HTTP(S) proxies at a closed port, so nothing reaches the network
or the real user's ~/.sky. The Task and Resources the provisioner builds are checked by
SkyPilot itself: the Task round-trips through `Task.from_yaml_config`, and the pinned
offering resolves in SkyPilot's catalog (the instance type exists in that region, with
those GPUs, at that market's price). SkyPilot's real exception classes map to the broker's
errors; the SDK surface the provisioner calls is checked against the installed SkyPilot.
Calls through SkyPilot's API server are in tests/test_provision_skypilot_server.py.
"""

from __future__ import annotations

import copy
import csv
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

from skybroker.provision import (
    CapacityError,
    CredentialsError,
    MissingExtraError,
    NoCloudAccessError,
    ProvisionError,
    ReplicaSpec,
)
from skybroker.provision.sky_names import cluster_name, replica_hash
from skybroker.provision.sky_setup import PYTHON, progress_loop, setup_script
from skybroker.provision.skypilot import (
    SKYPILOT_RANGE,
    SkyPilotProvisioner,
    check_sdk,
    import_sky,
    map_sky_error,
    missing_sdk_calls,
)
from tests.skypilot_env import ROOT, free_port, hide_skypilot, replica_spec, seed_catalogs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
WHEEL = "skybroker-0.1.0-py3-none-any.whl"
BROKER = "brk22"
CLUSTER = cluster_name("demo-12", BROKER)
LABELS = {"skybroker-broker": BROKER, "skybroker-replica": replica_hash("demo-12")}


def Prov(**kw: Any) -> SkyPilotProvisioner:
    return SkyPilotProvisioner(**{"broker": BROKER, **kw})


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """SkyPilot imported with its HOME and runtime dir in a temp dir with seeded catalogs."""
    home = tmp_path_factory.mktemp("skyhome")
    catalogs = seed_catalogs(home)
    mp = pytest.MonkeyPatch()
    closed = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        mp.setenv(name, closed)
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.setenv("HOME", str(home))
    mp.setenv("SKY_RUNTIME_DIR", str(home))
    mp.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    mp.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    sky = import_sky()
    from sky.catalog import common

    # Paths SkyPilot fixed at import, in case another test module imported it first.
    mp.setattr(common, "_ABSOLUTE_VERSIONED_CATALOG_DIR", str(catalogs))
    yield sky
    mp.undo()


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    path = tmp_path / WHEEL
    path.write_bytes(b"PK")  # the provisioner only mounts it
    return path


def run_script(*engines: str) -> str:
    """The run script around `engines` (each ending in ` &`): pids kept, the model cache's
    progress printed while they live, the first engine's exit ends the job."""
    lines = ["pids="]
    for engine in engines:
        lines += [engine, 'pids="$pids $!"']
    return "\n".join([*lines, progress_loop("$pids"), "wait -n $pids; code=$?",
                      "kill $pids 2>/dev/null", "exit $code"])  # fmt: skip


def _spec(**kw: Any) -> ReplicaSpec:
    base = dict(engine_args={"max_model_len": 4096}, envs={"SKYBROKER_LOG": "info"})
    return replica_spec(**{**base, **kw})


def test_golden_task_yaml_for_hub_model(sky, wheel) -> None:
    prov = Prov(workdir=False, wheel=wheel)
    config = prov.build_task(_spec()).to_yaml_config()
    assert "HF_TOKEN" not in config["envs"]  # secrets travel as SkyPilot secrets only
    assert config == {
        "name": CLUSTER,
        "setup": setup_script(f"'/skybroker/dist/{WHEEL}[engine,gpu]'"),
        "run": run_script(
            f"{PYTHON} -m engine.serve --model meta-llama/Llama-3.1-8B-Instruct "
            "--served-model-name llama --host 0.0.0.0 --port 8000 --max-model-len 4096 &"
        ),
        "envs": {"SKYBROKER_LOG": "info"},
        "secrets": {"HF_TOKEN": "hf_secret_value"},
        "num_nodes": 1,
        "file_mounts": {f"/skybroker/dist/{WHEEL}": str(wheel)},
        "volumes": {},
        "resources": {
            "infra": "aws/us-east-1",
            "instance_type": "g5.xlarge",
            "accelerators": {"A10G": 1},
            "use_spot": True,
            "ports": ["8000"],
            "labels": LABELS,
            "memory": "16.0",
        },
    }


def test_task_for_local_model_dir_and_gguf_uses_file_mounts_and_workdir(sky, tmp_path) -> None:
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    gguf = tmp_path / "smollm2.gguf"
    gguf.write_bytes(b"GGUF")
    prov = Prov(workdir=tmp_path)
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
    assert config["setup"] == setup_script("-e '.[engine,gpu]'")
    assert config["setup"].endswith("install -q -e '.[engine,gpu]'; fi")
    assert "--model /skybroker/model " in config["run"]
    assert "--tensor-parallel-size 4" in config["run"]
    assert config["resources"]["instance_type"] == "g5.12xlarge"
    assert config["resources"]["use_spot"] is False  # pinned to on-demand
    config = prov.build_task(_spec(model=str(gguf))).to_yaml_config()
    assert config["file_mounts"] == {"/skybroker/model/smollm2.gguf": str(gguf)}
    assert "--model /skybroker/model/smollm2.gguf" in config["run"]


def test_resources_are_pinned(sky) -> None:
    res = Prov().build_resources(_spec(region="us-west-2"))
    assert str(res.cloud) == "AWS"
    assert res.region == "us-west-2"
    assert res.instance_type == "g5.xlarge"
    assert res.use_spot is True
    assert res.ports == ["8000"]
    with pytest.raises(ProvisionError, match="use infra: local"):
        Prov().build_resources(_spec(cloud="local"))


def test_project_root_is_this_checkout() -> None:
    from skybroker.provision.skypilot import project_root

    root = project_root()
    assert root is not None and (root / "engine").is_dir()
    assert Path(root / "pyproject.toml").exists()


def test_golden_task_yaml_for_data_parallel_spot_placement(sky, wheel) -> None:
    """A placement of 2 engines x TP 2 on a 4-GPU spot instance: one engine per GPU pair and
    port, every port exposed, GPUs and market pinned."""
    prov = Prov(workdir=False, wheel=wheel)
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
        f"{PYTHON} -m engine.serve --model meta-llama/Llama-3.1-8B-Instruct "
        "--served-model-name llama --host 0.0.0.0 --port {port} --tensor-parallel-size 2 "
        "--max-model-len 4096"
    )
    assert config == {
        "name": CLUSTER,
        "setup": setup_script(f"'/skybroker/dist/{WHEEL}[engine,gpu]'"),
        "run": run_script(
            f"CUDA_VISIBLE_DEVICES=0,1 {engine.format(port=8000)} &",
            f"CUDA_VISIBLE_DEVICES=2,3 {engine.format(port=8001)} &",
        ),
        "num_nodes": 1,
        "file_mounts": {f"/skybroker/dist/{WHEEL}": str(wheel)},
        "volumes": {},
        "resources": {
            "infra": "aws/us-east-1",
            "instance_type": "g5.12xlarge",
            "accelerators": {"A10G": 4},
            "use_spot": True,
            "ports": ["8000-8001"],  # SkyPilot folds consecutive ports into a range
            "labels": LABELS,
            "memory": "192.0",
        },
    }


def test_golden_task_yaml_pins_gpus_of_an_on_demand_tp_placement(sky, wheel) -> None:
    spec = _spec(
        instance_type="g5.12xlarge", gpu_count=4, tensor_parallel_size=4, spot=False, secrets={}
    )
    prov = Prov(workdir=False, wheel=wheel)
    res = prov.build_task(spec).to_yaml_config()["resources"]
    assert res["accelerators"] == {"A10G": 4} and res["use_spot"] is False
    assert res["ports"] == ["8000"]


def test_placement_needing_more_gpus_than_the_instance_has_is_refused(sky) -> None:
    spec = _spec(gpu_count=1, tensor_parallel_size=2, data_parallel=1)
    with pytest.raises(ProvisionError, match=r"need 2 GPUs, but g5.xlarge has 1"):
        Prov().build_resources(spec)


def test_task_round_trips_through_skypilots_yaml(sky, wheel) -> None:
    config = Prov(workdir=False, wheel=wheel).build_task(_spec()).to_yaml_config()
    again = sky.Task.from_yaml_config(copy.deepcopy(config)).to_yaml_config()
    assert {k: v for k, v in again.items() if not k.startswith("_")} == config


def _bundled(cloud: str, region: str, instance: str) -> dict[str, str]:
    with (ROOT / "catalogs" / "offerings.csv").open() as f:
        rows = csv.DictReader(f)
        return next(
            r
            for r in rows
            if (r["cloud"], r["region"], r["instance_type"]) == (cloud, region, instance)
        )


@pytest.mark.parametrize(("instance", "spot"), [("g5.xlarge", True), ("g6e.xlarge", False)])
def test_pinned_offering_resolves_in_skypilots_catalog(sky, instance: str, spot: bool) -> None:
    from sky import catalog

    row = _bundled("aws", "us-east-1", instance)
    spec = _spec(instance_type=instance, gpu=row["gpu"], gpu_count=int(row["gpu_count"]), spot=spot)
    res = Prov().build_resources(spec)
    assert catalog.instance_type_exists(res.instance_type, clouds="aws")
    assert catalog.validate_region_zone(res.region, None, clouds="aws")[0] == "us-east-1"
    found = catalog.get_accelerators_from_instance_type(res.instance_type, clouds="aws")
    assert found == res.accelerators == {row["gpu"]: int(row["gpu_count"])}
    price = float(row["spot_price"] if spot else row["price"])
    assert res.get_cost(3600) == pytest.approx(price)  # that market's price in that region


def test_the_installed_sdk_has_every_call_the_provisioner_makes(sky) -> None:
    from packaging.specifiers import SpecifierSet
    from sky.client import sdk

    assert missing_sdk_calls(sdk) == []
    assert sky.__version__ in SpecifierSet(SKYPILOT_RANGE)
    cloud = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("skypilot[") and d.endswith(SKYPILOT_RANGE) for d in cloud["cloud"])


def test_an_sdk_lacking_a_call_fails_clearly(sky) -> None:
    from sky.client import sdk

    old = types.ModuleType("sdk")
    for name in ("get", "stream_and_get", "status", "down", "endpoints", "tail_logs"):
        setattr(old, name, getattr(sdk, name))
    old.check = types.ModuleType("sky.check")  # the shadowing that broke `sky.check(...)`
    old.launch = lambda task, cluster_name=None: None  # no dryrun
    with pytest.raises(ProvisionError) as info:
        check_sdk(old)
    message = str(info.value)
    assert "lacks check, launch(retry_until_up)" in message and "launch(dryrun)" in message
    assert "api_cancel" in message
    assert f"pip install 'skypilot{SKYPILOT_RANGE}'" in message


def test_skypilots_exceptions_become_the_brokers(sky) -> None:
    sx = sky.exceptions
    spec = _spec()
    err = map_sky_error(
        sx.ResourcesUnavailableError(
            "Failed to provision all possible launchable resources.",
            failover_history=[sx.ResourcesUnavailableError("InsufficientInstanceCapacity")],
        ),
        spec,
        "sky launch",
    )
    assert isinstance(err, CapacityError)
    assert err.offering_key == ("aws", "us-east-1", "g5.xlarge", True)
    assert "InsufficientInstanceCapacity" in str(err)
    err = map_sky_error(
        sx.ResourcesUnavailableError(
            "failed", failover_history=[sx.InvalidCloudCredentials("AWS credentials expired")]
        ),
        spec,
    )
    assert isinstance(err, CredentialsError) and "sky check" in str(err)
    err = map_sky_error(sx.NoCloudAccessError("Cloud access is not set up."), spec)
    assert isinstance(err, NoCloudAccessError) and "sky check" in str(err)
    err = map_sky_error(sx.ApiServerConnectionError("http://127.0.0.1:46580"), None, "sky status")
    assert "cannot reach the SkyPilot API server" in str(err) and "sky api start" in str(err)
    err = map_sky_error(RuntimeError("Failed to SSH to 1.2.3.4"), spec, "sky launch")
    assert str(err).startswith("sky launch failed for demo-12 on aws/us-east-1/g5.xlarge/True")
    assert "RuntimeError: Failed to SSH to 1.2.3.4" in str(err)


def test_missing_skypilot_names_the_extra(monkeypatch) -> None:
    hide_skypilot(monkeypatch)
    with pytest.raises(MissingExtraError, match=r"pip install 'skybroker\[cloud\]'"):
        Prov().check({"aws"})
    with pytest.raises(MissingExtraError, match=r"pip install 'skybroker\[cloud\]'"):
        Prov().launch(_spec())
