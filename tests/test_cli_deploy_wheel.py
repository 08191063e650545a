"""A non-editable install carries the bundled catalogs: build the wheel from a copy of the
tree (the PEP 517 backend pip uses, no network), check what it holds, and plan an example
with the wheel's own files (unpacked on PYTHONPATH, run outside the source tree)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
TREE = ("pyproject.toml", "README.md", "skybroker", "engine", "kernels", "catalogs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in TREE:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    build = "from setuptools import build_meta as b; import sys; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", build, str(dist)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "absent from the `packages` configuration" not in out.stderr  # no setuptools nag
    return dist / out.stdout.strip().splitlines()[-1]


def test_wheel_ships_catalogs_and_profiles_as_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = {p.name for p in (ROOT / "catalogs").glob("*.csv")}
    assert bundled >= {"offerings.csv", "gpus.csv", "regions.csv", "egress.csv"}
    assert {f"skybroker/_catalogs/{n}" for n in bundled} <= names
    profiles = {f"skybroker/_catalogs/profiles/{p.name}" for p in ROOT.glob("catalogs/profiles/*")}
    assert {p for p in profiles if p.endswith(".json")} <= names
    assert not [n for n in names if n.startswith("skybroker/_catalogs/") and n.endswith(".py")]
    assert not [n for n in names if n.startswith("catalogs/")]  # nothing at the top level
    assert {"skybroker/py.typed", "engine/serve.py", "kernels/ops.py"} <= names


def test_plan_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "SKYBROKER_HOME": str(tmp_path / "home")}
    where = subprocess.run(
        [sys.executable, "-c", "from skybroker.catalog import loader; print(loader.BUNDLED_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == site / "skybroker" / "_catalogs"  # not the source tree
    # The example, narrowed to one cloud and two GPU kinds so the planner's work stays small
    # (the whole catalog is still read from the wheel).
    spec_data = yaml.safe_load((ROOT / "examples" / "chat-8b-us-eu.yaml").read_text())
    spec_data["constraints"].update(clouds=["aws"], gpus=["A100", "L40S"])
    spec_data["workload"]["users"] = {"us-east": 1.0}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_data))
    out = subprocess.run(
        [sys.executable, "-m", "skybroker", "plan", str(spec), "--json", "--no-baselines"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["placements"] and plan["cost_per_hour"] > 0
    assert all(p["cloud"] == "aws" for p in plan["placements"])
