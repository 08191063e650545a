"""The SkyPilot provisioner's reading of SkyPilot's states: preemption, failed jobs, slow
starts, names and ownership, launches in flight, leaks.

Where SkyPilot's offline API server cannot go (a cluster that gets UP, a job that runs and
ends, a spot reclaim) the provisioner talks to tests/sky_fake.py, which follows SkyPilot's
documented states with SkyPilot's own types (StatusResponse, CloudVmRayResourceHandle,
Resources, ClusterStatus, JobStatus, RequestPayload). Names are checked with SkyPilot's own
validation and on-cloud naming. What the real API server can answer is in
tests/test_provision_skypilot_server.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from skybroker.provision import (
    ProvisionError,
    ReplicaHandle,
    ReplicaState,
    sky_jobs,
    sky_names,
    sky_setup,
)
from skybroker.provision import skypilot as skypilot_mod
from skybroker.provision.skypilot import SkyPilotProvisioner
from tests.sky_fake import FakeSDK
from tests.skypilot_env import ROOT, replica_spec
from tests.test_provision_skypilot import sky  # noqa: F401  (the offline SkyPilot fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BROKER = "brk22"


@pytest.fixture
def fake(sky, monkeypatch) -> FakeSDK:  # noqa: F811
    sdk = FakeSDK()
    monkeypatch.setattr(skypilot_mod, "import_sdk", lambda: sdk)
    return sdk


def _prov(tmp_path: Path, **kw: Any) -> SkyPilotProvisioner:
    wheel = tmp_path / "skybroker-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    base = dict(workdir=False, wheel=wheel, home=tmp_path / "home", broker=BROKER, job_poll_s=0)
    return SkyPilotProvisioner(**{**base, **kw})


def _launch(prov: SkyPilotProvisioner, **kw: Any) -> ReplicaHandle:
    handle = prov.launch(replica_spec(**kw))
    # The controller keeps the handle as JSON and rebuilds it on every pass.
    return ReplicaHandle.from_dict(handle.to_dict())


# -- 1. preemption -------------------------------------------------------------------------


def test_a_reclaimed_spot_cluster_is_preempted_not_dead(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    spot = _launch(prov, name="chat-1", spot=True)
    ondemand = _launch(prov, name="chat-2", spot=False)
    assert prov.statuses([spot, ondemand]) == {"chat-1": "RUNNING", "chat-2": "RUNNING"}
    fake.preempt(spot.info["cluster"])  # AWS/GCP: terminated, dropped after refresh
    fake.preempt(ondemand.info["cluster"])
    fresh = _prov(tmp_path)  # a restarted broker: only the stored handle remembers "UP"
    assert fresh.statuses([spot, ondemand]) == {"chat-1": "PREEMPTED", "chat-2": "DEAD"}
    assert "preempted" in fresh.failure(spot)
    assert "on-demand cluster" in fresh.failure(ondemand)


def test_a_spot_cluster_never_seen_up_that_vanishes_is_dead(fake, tmp_path) -> None:
    handle = ReplicaHandle("skypilot", "chat-3", info={"spot": True})
    assert _prov(tmp_path).status(handle) == ReplicaState.DEAD


def test_stopped_and_autostopping_clusters(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    spot = _launch(prov, name="chat-1", spot=True)
    ondemand = _launch(prov, name="chat-2", spot=False)
    fake.stop(spot.info["cluster"])  # Azure deallocates a reclaimed spot VM
    fake.stop(ondemand.info["cluster"])
    assert prov.statuses([spot, ondemand]) == {"chat-1": "PREEMPTED", "chat-2": "DEAD"}
    assert "stopped by the cloud (preempted)" in prov.failure(spot)
    assert prov.failure(ondemand).endswith("is STOPPED (stopped outside the broker?)")
    third = _launch(prov, name="chat-3", spot=False)
    fake.clusters[third.info["cluster"]].status = "AUTOSTOPPING"  # idle: the job ended
    fake.end_job(third.info["cluster"], "FAILED", ["engine: CUDA out of memory"])
    assert prov.status(third) == ReplicaState.FAILED
    why = prov.failure(third)
    assert why.startswith(f"job 1 on {third.info['cluster']} is FAILED; log tail: ")
    assert "CUDA out of memory" in why and "AUTOSTOPPING" in why


# -- 2. the replica's job ------------------------------------------------------------------


def test_a_failed_setup_fails_fast_with_the_jobs_state_exit_code_and_log(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    handle = _launch(prov)
    assert prov.status(handle) == ReplicaState.RUNNING  # SETTING_UP
    fake.end_job(
        handle.info["cluster"],
        "FAILED_SETUP",
        [
            sky_setup.NO_PYTHON,
            "\x1b[31mERROR: \x1b[0mJob 1's setup failed with return code 1 (pid=4242).",
        ],
    )
    assert prov.status(handle) == ReplicaState.FAILED
    why = prov.failure(handle)
    assert why.startswith(f"job 1 on {handle.info['cluster']} is FAILED_SETUP; exit code 1")
    assert "no Python >= 3.11" in why
    assert prov.exit_code(handle) == 1


def test_an_engine_crash_reports_the_return_code(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    handle = _launch(prov)
    fake.end_job(
        handle.info["cluster"],
        "FAILED",
        ["Killed", "ERROR: Job 1 failed with return code list: [137] "],
    )
    assert prov.status(handle) == ReplicaState.FAILED
    assert "is FAILED; exit code 137" in prov.failure(handle)


def test_an_unreadable_job_state_leaves_the_replica_running_and_others_answered(
    fake, tmp_path
) -> None:
    from sky import exceptions as sx

    prov = _prov(tmp_path)
    flaky, fine = _launch(prov, name="chat-1"), _launch(prov, name="chat-2")
    fake.clusters[flaky.info["cluster"]].job_error = sx.CommandError(
        255, "ssh", "Failed to run command: ssh timed out", None
    )
    fake.end_job(fine.info["cluster"], "FAILED", ["boom"])
    assert prov.statuses([flaky, fine]) == {"chat-1": "RUNNING", "chat-2": "FAILED"}


def test_job_state_is_polled_at_most_every_job_poll_s(fake, tmp_path) -> None:
    prov = _prov(tmp_path, job_poll_s=3600)
    handle = _launch(prov)
    for _ in range(3):
        assert prov.status(handle) == ReplicaState.RUNNING
    assert [c for c, _ in fake.calls].count("job_status") == 1


# -- 3. startup deadline and progress -----------------------------------------------------


def test_startup_deadline_grows_with_the_model_and_skips_download_of_local_models(
    tmp_path,
) -> None:
    small = sky_setup.startup_deadline_s(replica_spec())
    big = sky_setup.startup_deadline_s(replica_spec(model="meta-llama/Llama-3.1-70B-Instruct"))
    assert small >= sky_setup.MIN_DEADLINE_S
    assert big > 3 * small  # ~141 GB of weights to download and load
    assert big == pytest.approx((600 + 141.1e9 / 50e6 + 141.1e9 / 200e6) * 1.5, rel=0.01)
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    local = sky_setup.startup_deadline_s(replica_spec(model=str(model)))
    assert local == pytest.approx(600 * 1.5, abs=1)  # install + load of 1 kB: no download
    runpod = sky_setup.startup_deadline_s(
        replica_spec(cloud="runpod", model="meta-llama/Llama-3.1-70B-Instruct")
    )
    assert runpod > big  # the slower default rate of clouds without a figure


def test_progress_changes_while_the_model_downloads(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    handle = _launch(prov)
    cluster = fake.clusters[handle.info["cluster"]]
    fake.clusters[handle.info["cluster"]].job_status = "RUNNING"
    first = prov.progress(handle)
    cluster.log.append(f"{sky_setup.PROGRESS_MARK}: 1048576 bytes")
    second = prov.progress(handle)
    cluster.log.append(f"{sky_setup.PROGRESS_MARK}: 9437184 bytes")
    third = prov.progress(handle)
    assert len({first, second, third}) == 3
    assert prov.progress(handle) == third  # no change, same marker


# -- 6. names and ownership -----------------------------------------------------------------


def test_long_deployment_names_no_longer_collide(sky) -> None:  # noqa: F811
    from sky.utils import common_utils, registry

    for length in (55, 57, 80):
        dep = "d" * length
        names = [sky_names.cluster_name(f"{dep}-{i}", BROKER) for i in range(1, 21)]
        assert len(set(names)) == 20, length
        for name in names:
            common_utils.check_cluster_name_is_valid(name)
            assert len(name) <= sky_names.CLUSTER_NAME_MAX
    a, b = (sky_names.cluster_name("chat-1", broker) for broker in ("aaaaa", "bbbbb"))
    assert a != b and a.startswith("sb-aaaaa-chat-1-")
    # SkyPilot keeps the name on the cloud whole (plus its user hash) on every cloud the
    # bundled catalog plans on.
    planned = {line.split(",")[0] for line in (ROOT / "catalogs/offerings.csv").open()} - {"cloud"}
    name = sky_names.cluster_name("x" * 90, BROKER)
    for cloud_name in sorted(planned):
        limit = registry.CLOUD_REGISTRY.from_str(cloud_name).max_cluster_name_length()
        on_cloud = common_utils.make_cluster_name_on_cloud(name, limit)
        assert on_cloud.startswith(name + "-"), (cloud_name, limit, on_cloud)
        cloud = registry.CLOUD_REGISTRY.from_str(cloud_name)
        for key, value in sky_names.labels("x" * 90, BROKER).items():  # GCP's rules are strict
            assert cloud.is_label_valid(key, value) == (True, None), (cloud_name, key)


def test_broker_id_is_kept_under_the_brokers_home(tmp_path) -> None:
    first = sky_names.broker_id(tmp_path)
    assert first == sky_names.broker_id(tmp_path)
    assert (tmp_path / "broker-id").read_text().strip() == first
    assert sky_names.broker_id(tmp_path / "other") != first


def test_a_cluster_of_another_broker_is_neither_reused_nor_downed(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    cluster = prov.cluster_of("demo-12")
    fake.add_cluster(cluster, True, {"skybroker-broker": "zzzzz", "skybroker-replica": "x"})
    with pytest.raises(ProvisionError, match=r"belongs to broker 'zzzzz'.*refusing to reuse"):
        prov.launch(replica_spec())
    with pytest.raises(ProvisionError, match="refusing to down"):
        prov.terminate(ReplicaHandle("skypilot", "demo-12"))
    assert cluster in fake.clusters
    assert ("launch", cluster) not in fake.calls


# -- 7. launches in flight and leaks -------------------------------------------------------


def test_the_launch_request_is_recorded_and_cancelled_on_terminate(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    cluster = prov.cluster_of("demo-12")
    queued = fake.add_request("launch", cluster, "PENDING")
    prov._record_launch(cluster, "demo-12", queued)  # what a broker that died mid-launch left
    handle = ReplicaHandle("skypilot", "demo-12")  # a PROVISIONING row: a name only
    assert prov.reconcile_launch(handle) == f"cancelled launch request {queued} (PENDING)"
    assert fake.requests[queued].status == "CANCELLED"
    assert prov.reconcile_launch(handle) is None  # nothing left in flight
    again = fake.add_request("launch", cluster, "RUNNING")
    prov._record_launch(cluster, "demo-12", again)
    prov.terminate(handle)  # cancels first, then downs (the cluster does not exist: fine)
    assert fake.requests[again].status == "CANCELLED"
    assert not prov._launch_file(cluster).exists()
    launched = _launch(prov)
    assert launched.info["request_id"] in fake.requests


def test_sweep_downs_this_brokers_unknown_clusters_only(fake, tmp_path) -> None:
    prov = _prov(tmp_path)
    kept = _launch(prov, name="chat-1")
    leaked = _launch(prov, name="chat-2")
    other = sky_names.cluster_name("chat-2", "zzzzz")
    fake.add_cluster(other, True, sky_names.labels("chat-2", "zzzzz"))
    fake.add_cluster("my-own-cluster", False, {})
    queued = fake.add_request("launch", prov.cluster_of("chat-3"), "PENDING")
    prov._record_launch(prov.cluster_of("chat-3"), "chat-3", queued)
    gone = prov.sweep({"chat-1"})
    assert sorted(gone) == sorted([leaked.info["cluster"], prov.cluster_of("chat-3")])
    assert set(fake.clusters) == {kept.info["cluster"], other, "my-own-cluster"}
    assert fake.requests[queued].status == "CANCELLED"


# -- 10, 12, 13 ----------------------------------------------------------------------------


def test_launch_waits_for_the_endpoint_to_be_exposed(fake, tmp_path) -> None:
    fake.expose_after = 2
    prov = _prov(tmp_path, endpoint_wait_s=30)
    assert _launch(prov).url == "https://3.90.1.2:8000"  # TLS by default
    fake.expose_after = 10**6
    slow = _prov(tmp_path, endpoint_wait_s=0.2)
    with pytest.raises(ProvisionError, match=r"no endpoint for port 8000 of demo-9 within 0s"):
        slow.launch(replica_spec(name="demo-9"))


def test_statuses_is_one_sky_status_call(fake, tmp_path) -> None:
    prov = _prov(tmp_path, job_poll_s=3600)
    handles = [_launch(prov, name=f"chat-{i}") for i in range(5)]
    fake.calls.clear()
    assert set(prov.statuses(handles).values()) == {ReplicaState.RUNNING}
    prov.statuses(handles)
    assert [c for c, _ in fake.calls].count("status") == 2


def test_launch_logs_are_bounded_per_replica(fake, tmp_path) -> None:
    fake.launch_output = "".join(f"line {i}\n" for i in range(20000))
    prov = _prov(tmp_path, log_limit=4096)
    _launch(prov, name="chat-1")
    log = prov.launch_log("chat-1")
    assert len(log) == 4096 and log.endswith("line 19999\n")
    prov.terminate(ReplicaHandle("skypilot", "chat-1"))
    assert prov.launch_log("chat-1") == ""


def test_ring_log_keeps_the_last_characters() -> None:
    ring = sky_jobs.RingLog(10)
    for chunk in ("abc", "defgh", "ijklmnop", "q"):
        ring.write(chunk)
    assert ring.getvalue() == "hijklmnopq"


# -- 14. the replica's Python ----------------------------------------------------------------


PYENV = Path("/root/.pyenv/versions")


def _pick(bin_dir: Path) -> subprocess.CompletedProcess:
    script = sky_setup.pick_python_script() + '\necho "picked=$SB_PY"'
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent), "PIP_NO_INDEX": "1"}
    return subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True)


def _bin(tmp_path: Path, pythons: dict[str, str]) -> Path:
    """A PATH directory holding real interpreters under the given names."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, version in pythons.items():
        target = Path(version) if version.startswith("/") else PYENV / version / "bin" / "python"
        (bin_dir / name).symlink_to(target)
    return bin_dir


needs_pyenv = pytest.mark.skipif(
    not (PYENV / "3.10.13").is_dir() or not (PYENV / "3.12.1").is_dir(),
    reason="needs pyenv's 3.10 and 3.12 interpreters",
)


def test_setup_takes_the_python3_on_path_when_it_is_new_enough(tmp_path) -> None:
    out = _pick(_bin(tmp_path, {"python3": sys.executable}))
    assert out.returncode == 0, out.stderr
    assert f"picked={tmp_path}/bin/python3" in out.stdout


def test_setup_without_any_python_or_uv_fails_clearly(tmp_path) -> None:
    out = _pick(_bin(tmp_path, {}))
    assert out.returncode == 1
    assert sky_setup.NO_PYTHON in out.stderr


@needs_pyenv
def test_setup_skips_an_older_python_on_path_and_picks_one_of_at_least_3_11(tmp_path) -> None:
    out = _pick(_bin(tmp_path, {"python3": "3.10.13", "python": "3.8.18", "python3.12": "3.12.1"}))
    assert out.returncode == 0, out.stderr
    assert f"picked={tmp_path}/bin/python3.12" in out.stdout
    assert "(Python 3.12.1)" in out.stdout


@needs_pyenv
def test_setup_with_only_an_older_python_and_no_uv_fails_clearly(tmp_path) -> None:
    out = _pick(_bin(tmp_path, {"python3": "3.10.13"}))
    assert out.returncode == 1
    assert sky_setup.NO_PYTHON in out.stderr
    assert "picked=" not in out.stdout


def test_the_run_script_is_valid_bash_and_uses_the_venv_python() -> None:
    script = sky_setup.run_script(replica_spec(data_parallel=2, gpu_count=2), [8000, 8001])
    assert subprocess.run(["/bin/bash", "-n", "-c", script]).returncode == 0
    assert script.count(f"{sky_setup.PYTHON} -m engine.serve") == 2
    setup = sky_setup.setup_script("'/skybroker/dist/x.whl[engine]'")
    assert subprocess.run(["/bin/bash", "-n", "-c", setup]).returncode == 0


def _tiny_wheel(tmp_path: Path) -> Path:
    """A one-module wheel with no dependencies (what setup installs, offline)."""
    import base64
    import hashlib
    import zipfile

    files = {
        "tinypkg/__init__.py": "VALUE = 42\n",
        "tinypkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files["tinypkg-0.1.dist-info/RECORD"] = "\n".join([*record, "tinypkg-0.1.dist-info/RECORD,,"])
    path = tmp_path / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


UV = Path(sys.executable).parent / "uv"


@pytest.mark.skipif(not UV.exists(), reason="needs uv beside the test interpreter")
def test_setup_makes_a_venv_with_a_new_enough_python_and_installs_into_it(tmp_path) -> None:
    """The whole setup script, offline: with pyenv's interpreters, python3 on PATH is 3.10,
    so it takes python3.12 (else the test's own Python as python3); makes the venv with uv
    and installs the package there; the run's Python is that venv's."""
    wheel = _tiny_wheel(tmp_path)
    have_pyenv = (PYENV / "3.10.13").is_dir() and (PYENV / "3.12.1").is_dir()
    pythons = {"python3": "3.10.13", "python3.12": "3.12.1"} if have_pyenv else {}
    bin_dir = _bin(tmp_path, pythons or {"python3": sys.executable})
    want = "(3, 12)" if have_pyenv else str(tuple(sys.version_info[:2]))
    (bin_dir / "uv").symlink_to(UV)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(home), "UV_OFFLINE": "1", "UV_NO_CONFIG": "1"}
    script = sky_setup.setup_script(f"--no-index '{wheel}'")
    out = subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    run = subprocess.run(
        ["/bin/bash", "-c", f'{sky_setup.PYTHON} -c "import sys, tinypkg; print(sys.version_info[:2], tinypkg.VALUE)"'],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.stdout.strip() == f"{want} 42", run.stderr
    again = subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # a re-run setup keeps the venv
