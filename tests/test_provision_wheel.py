"""A replica installs exactly the skybroker the broker runs: from a wheel install (the
wheel unpacked on PYTHONPATH, outside the source tree) the SkyPilot provisioner rebuilds
that wheel from the installed distribution's RECORD and mounts it into the Task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_cli_deploy_wheel import wheel  # noqa: F401 (the built wheel fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROBE = """
import json, sys
from pathlib import Path
from skybroker.provision.skypilot import SkyPilotProvisioner, project_root
prov = SkyPilotProvisioner(wheel=None)
setup, mounts = prov.install()
print(json.dumps({"root": str(project_root()), "setup": setup, "mounts": mounts}))
"""


def test_replica_gets_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:  # noqa: F811
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "SKYBROKER_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["root"] == "None"  # no source tree: the wheel path
    [(remote, local)] = answer["mounts"].items()
    assert remote == f"/skybroker/dist/{wheel.name}"
    venv_python = "$HOME/.skybroker/venv/bin/python"
    assert f"uv pip install -q --python {venv_python} '{remote}[engine,gpu]'" in answer["setup"]
    rebuilt, original = zipfile.ZipFile(local), zipfile.ZipFile(wheel)
    skip = ("RECORD",)
    names = {n for n in original.namelist() if not n.endswith(skip)}
    assert {n for n in rebuilt.namelist() if not n.endswith(skip)} == names
    for name in names:
        assert rebuilt.read(name) == original.read(name), name
    # pip accepts it: installs into a target dir and the engine is there.
    target = tmp_path / "replica"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(target), local],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "engine" / "serve.py").exists() and (target / "engine" / "hub.py").exists()
