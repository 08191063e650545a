"""`skybroker catalog gpus|offerings|info` through typer's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

from typer.testing import CliRunner

from skybroker.catalog_cli import staleness_days
from skybroker.cli import app

runner = CliRunner()


def run(*args: str) -> str:
    result = runner.invoke(app, ["catalog", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_gpus_table_and_json() -> None:
    out = run("gpus")
    for text in ("H100", "L4", "on-demand", "spot", "runpod", "azure"):
        assert text in out
    rows = json.loads(run("gpus", "--json"))
    by = {r["gpu"]: r for r in rows}
    assert by["H100"]["memory_bandwidth_gbs"] == 3350
    t4_azure = by["T4"]["cheapest_per_gpu_hour"]["azure"]
    assert t4_azure["on_demand"] == 0.526 and 0 < t4_azure["spot"] < 0.526
    # per-GPU price: an 8-GPU instance's price divided by 8
    assert by["B200"]["cheapest_per_gpu_hour"]["aws"]["on_demand"] < 20


def test_offerings_filters_json() -> None:
    rows = json.loads(
        run(
            "offerings",
            "--gpu",
            "H100",
            "--cloud",
            "aws",
            "--region",
            "us-east-1",
            "--spot",
            "--max-price",
            "100",
            "--json",
        )
    )
    assert rows and all(r["gpu"] == "H100" and r["cloud"] == "aws" for r in rows)
    assert all(r["spot_price"] is not None and r["spot_price"] <= 100 for r in rows)
    assert rows[0]["price_per_gpu_hour"] == round(rows[0]["spot_price"] / rows[0]["gpu_count"], 5)
    big = json.loads(run("offerings", "--min-gpu-memory", "600", "--limit", "10000", "--json"))
    assert big and all(r["gpu_memory_gib"] * r["gpu_count"] >= 600 for r in big)


def test_offerings_table_and_no_match() -> None:
    out = run("offerings", "--gpu", "L4", "--cloud", "gcp", "--on-demand", "--limit", "3")
    assert "g2-standard-4" in out and "(first 3)" in out
    result = runner.invoke(app, ["catalog", "offerings", "--gpu", "H900"])
    assert result.exit_code == 2 and "unknown GPU kind 'H900'; the catalog has: " in result.output
    result = runner.invoke(app, ["catalog", "offerings", "--cloud", "moon,aws"])
    assert result.exit_code == 2 and "unknown cloud 'moon'" in result.output
    result = runner.invoke(app, ["catalog", "offerings", "--gpu", "B200", "--max-price", "0.01"])
    assert result.exit_code == 1 and "No offering matches" in result.output
    result = runner.invoke(app, ["catalog", "offerings", "--limit", "0"])
    assert result.exit_code == 2 and "--limit" in result.output  # as the API: limit >= 1


def test_user_catalog_dir_and_bad_file(tmp_path: Path) -> None:
    (tmp_path / "offerings.csv").write_text(
        "cloud,region,zone,instance_type,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price,spot_price\n"
        "onprem,lab,,rack-1,L4,2,24,32,128,0.10,\n"
    )
    rows = json.loads(run("offerings", "--cloud", "onprem", "--catalog", str(tmp_path), "--json"))
    assert [r["instance_type"] for r in rows] == ["rack-1"]
    (tmp_path / "offerings.csv").write_text(
        "cloud,region,zone,instance_type,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price,spot_price\n"
        "onprem,lab,,rack-1,L4,two,24,32,128,0.10,\n"
    )
    result = runner.invoke(app, ["catalog", "gpus", "--catalog", str(tmp_path)])
    assert result.exit_code == 2
    assert "offerings.csv:2: column 'gpu_count'" in result.output


def test_info_counts_and_staleness() -> None:
    data = json.loads(run("info", "--json"))
    assert set(data["clouds"]) >= {"aws", "gcp", "azure", "lambda", "runpod"}
    assert sum(c["offerings"] for c in data["clouds"].values()) == data["offerings"]
    assert data["clouds"]["aws"]["as_of"] and data["clouds"]["aws"]["age_days"] >= 0
    assert "Per cloud" in run("info")


def test_staleness_days() -> None:
    today = date(2026, 1, 31)
    assert staleness_days("2026-01-01", today) == 30
    assert staleness_days("2026-01", today) == 30
    assert staleness_days("2025", today) == 395
    assert staleness_days("soon", today) is None


def test_help_stays_light() -> None:
    code = (
        "import sys; from skybroker.cli import app; "
        "from typer.testing import CliRunner; CliRunner().invoke(app, ['catalog', '--help']); "
        "heavy = {'boto3', 'botocore', 'google.cloud', 'azure', 'sky', 'httpx'}; "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_refresh_writes_a_loadable_catalog(tmp_path: Path, monkeypatch) -> None:
    from skybroker.catalog.refresh import aws
    from skybroker.catalog.refresh.common import FetchStats
    from skybroker.catalog.schema import Offering

    row = Offering("aws", "us-east-1", "g6.xlarge", "L4", 1, 22.35, 4, 16, 0.8048, 0.3)
    seen = {}

    def fake_fetch(regions):
        seen["regions"] = list(regions)
        return [row], FetchStats(pages=3, kept=1, dropped_no_price=["aws/us-east-1/x"])

    monkeypatch.setattr(aws, "fetch_aws", fake_fetch)
    out = run("refresh", "--cloud", "aws", "--out", str(tmp_path), "--region", "us-east-1")
    assert seen["regions"] == ["us-east-1"]
    assert "wrote 1 offerings" in out and "dropped 1 without a price" in out
    rows = json.loads(run("offerings", "--catalog", str(tmp_path), "--cloud", "aws",
                          "--gpu", "L4", "--region", "us-east-1", "--json", "--limit", "10000"))  # fmt: skip
    g6 = [r for r in rows if r["instance_type"] == "g6.xlarge"]
    assert g6 and g6[0]["spot_price"] == 0.3


def test_refresh_bad_input() -> None:
    result = runner.invoke(app, ["catalog", "refresh", "--cloud", "oracle"])
    assert result.exit_code == 2 and "is not one of aws, gcp, azure" in result.output
    result = runner.invoke(
        app, ["catalog", "refresh", "--cloud", "gcp"], env={"GOOGLE_CLOUD_PROJECT": ""}
    )
    assert result.exit_code == 2 and "GCP project is required" in result.output
