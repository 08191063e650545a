"""Reading SkyPilot's own catalog files (seeded offline, in SkyPilot's column orders)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from skybroker.catalog import load_catalog
from skybroker.catalog.schema import Catalog
from skybroker.catalog.skypilot import (
    gpu_memory_gib,
    read_skypilot_catalogs,
    skypilot_catalog_dir,
)

AWS = """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone,Arch
m5.large,,,2,8,,0.096,0.04,us-east-1,use1-az1,x86_64
g5.xlarge,A10G,1,4,16,"{'Gpus': [{'Name': 'A10G', 'Manufacturer': 'NVIDIA', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 22888}}], 'TotalGpuMemoryInMiB': 22888}",1.006,0.45,us-east-1,use1-az1,x86_64
g5.xlarge,A10G,1,4,16,"{'Gpus': [{'Name': 'A10G', 'Manufacturer': 'NVIDIA', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 22888}}], 'TotalGpuMemoryInMiB': 22888}",1.006,0.40,us-east-1,use1-az2,x86_64
p5.48xlarge,H100,8,192,2048,,98.32,,us-east-1,use1-az1,x86_64
p5e.48xlarge,H200,8,192,2048,,,,eu-west-2,euw2-az1,x86_64
p4d.24xlarge,A100,8,96,1152,,30.0,31.0,ap-south-1,aps1-az1,x86_64
"""

# GCP: host rows and accelerator rows (empty InstanceType), one row per zone.
GCP = """InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,SpotPrice
a2-highgpu-1g,12,85,,,,us-central1,us-central1-a,0.73948,0.38812
a2-highgpu-1g,12,85,,,,us-central1,us-central1-b,0.73948,0.30000
,,,A100,1,,us-central1,us-central1-a,2.93383,1.5
,,,A100,1,,us-central1,us-central1-b,2.93383,1.6
g2-standard-4,4,16,L4,1,,us-east1,us-east1-b,0.14679,0.07
,,,L4,1,,us-east1,us-east1-b,0.56004,0.2862
n1-standard-4,4,15,,,,us-central1,us-central1-a,0.189999,0.04
n1-standard-8,8,30,,,,us-central1,us-central1-a,0.379998,0.08
,,,T4,1,,us-central1,us-central1-a,0.35,0.1915
,,,T4,2,,us-central1,us-central1-a,0.7,0.383
,,,V100,2,,us-central1,us-central1-a,4.96,2.4676
,,,T4,4,,us-central1,us-central1-a,1.4,0.766
,,,tpu-v6e-8,1,,us-central1,us-central1-a,700.0,700.0
"""

LAMBDA = """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
gpu_8x_h100_sxm5,H100,8,208,1800,23.92,us-east-1,"{'Gpus': [{'Name': 'H100', 'Manufacturer': 'NVIDIA', 'Count': 8, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 81920}",
gpu_1x_a10,A10,1,30,200,1.29,us-west-1,"{'Gpus': [{'Name': 'A10', 'Manufacturer': 'NVIDIA', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 24576}}], 'TotalGpuMemoryInMiB': 24576}",
"""

RUNPOD = """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Region,SpotPrice,Price,AvailabilityZone,GpuInfo
1x_H100-SXM_SECURE,H100-SXM,1.0,20.0,125.0,US,3.29,3.29,US-KS-1,"{'Gpus': [{'Name': 'H100 SXM', 'Manufacturer': 'Nvidia', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 80}}], 'TotalGpuMemoryInMiB': 80}"
"""


@pytest.fixture()
def sky_dir(tmp_path: Path) -> Path:
    root = tmp_path / ".sky" / "catalogs" / "v8"
    for cloud, text in (("aws", AWS), ("gcp", GCP), ("lambda", LAMBDA), ("runpod", RUNPOD)):
        (root / cloud).mkdir(parents=True)
        (root / cloud / "vms.csv").write_text(text)
    return tmp_path


def _read(sky_dir: Path) -> tuple[Catalog, object]:
    cat = load_catalog(include_bundled=True)
    fresh = Catalog(gpus=cat.gpus, regions=cat.regions)
    stats = read_skypilot_catalogs(fresh, sky_dir / ".sky" / "catalogs" / "v8")
    return fresh, stats


def find(cat: Catalog, cloud: str, itype: str, region: str, gpu: str | None = None):
    rows = [
        o for o in cat.offerings
        if o.cloud == cloud and o.instance_type == itype and o.region == region
        and (gpu is None or o.gpu == gpu)
    ]  # fmt: skip
    assert len(rows) == 1, rows
    return rows[0]


def test_catalog_dir_follows_sky_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))
    assert skypilot_catalog_dir() == tmp_path / ".sky" / "catalogs" / "v8"
    monkeypatch.delenv("SKY_RUNTIME_DIR")
    assert skypilot_catalog_dir() == Path("~").expanduser() / ".sky" / "catalogs" / "v8"


def test_aws_zones_collapse_and_cpu_rows_skipped(sky_dir: Path) -> None:
    cat, _ = _read(sky_dir)
    g5 = find(cat, "aws", "g5.xlarge", "us-east-1")
    assert (g5.price, g5.spot_price, g5.gpu_count) == (1.006, 0.40, 1)
    assert g5.gpu_memory_gib == pytest.approx(22.35)
    assert not [o for o in cat.offerings if o.instance_type == "m5.large"]
    p5 = find(cat, "aws", "p5.48xlarge", "us-east-1")
    assert p5.spot_price is None and p5.gpu_memory_gib == 80  # from the GPU spec table


def test_traps_dropped_with_warning(sky_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cat, stats = _read(sky_dir)
    assert not [o for o in cat.offerings if o.instance_type == "p5e.48xlarge"]  # no price
    p4d = find(cat, "aws", "p4d.24xlarge", "ap-south-1")
    assert p4d.price == 30.0 and p4d.spot_price is None  # spot 31 > on-demand 30
    assert stats.dropped_no_price == 1 and stats.dropped_spot_above_on_demand == 1
    assert "without a price" in caplog.text
    assert all(o.price != 0 and o.spot_price != 0 for o in cat.offerings)


def test_gcp_host_plus_accelerator(sky_dir: Path) -> None:
    cat, _ = _read(sky_dir)
    a2 = find(cat, "gcp", "a2-highgpu-1g", "us-central1")
    assert a2.gpu == "A100" and a2.gpu_count == 1 and a2.vcpus == 12
    assert a2.price == pytest.approx(0.73948 + 2.93383)
    assert a2.spot_price == pytest.approx(0.30 + 1.5)  # lowest zone of each part
    g2 = find(cat, "gcp", "g2-standard-4", "us-east1")
    assert g2.price == pytest.approx(0.70683)
    t4 = find(cat, "gcp", "n1-standard-4", "us-central1", "T4")
    assert t4.price == pytest.approx(0.54, abs=1e-5) and t4.spot_price == pytest.approx(0.2315)
    # n1-standard-8 carries T4x2 and V100x2: two offerings, told apart by the GPU.
    assert find(cat, "gcp", "n1-standard-8", "us-central1", "T4").gpu_count == 2
    assert find(cat, "gcp", "n1-standard-8", "us-central1", "V100").price == pytest.approx(
        5.34, abs=1e-5
    )
    assert not [o for o in cat.offerings if "tpu" in o.gpu.lower()]  # TPU placeholder 700
    assert not [o for o in cat.offerings if o.gpu == "T4" and o.gpu_count == 4]  # no n1-16 host


def test_lambda_and_runpod_memory_traps(sky_dir: Path) -> None:
    cat, _ = _read(sky_dir)
    h100 = find(cat, "lambda", "gpu_8x_h100_sxm5", "us-east-1")
    assert h100.gpu_memory_gib == 80 and h100.gpu_count == 8 and h100.spot_price is None
    rp = find(cat, "runpod", "1x_H100-SXM_SECURE", "US")
    assert rp.gpu == "H100" and rp.gpu_memory_gib == 80 and rp.price == 3.29


def test_gpu_memory_parse() -> None:
    assert gpu_memory_gib(None) is None
    assert gpu_memory_gib("not a dict") is None
    assert gpu_memory_gib("{'Gpus': []}") is None
    assert gpu_memory_gib("{'Gpus': [{'MemoryInfo': {'SizeInMiB': 16384}}]}") == 16


def test_load_catalog_include_skypilot_overrides_bundled(
    sky_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(sky_dir))
    bundled = load_catalog()
    merged = load_catalog(include_skypilot=True)
    before = find(bundled, "aws", "g5.xlarge", "us-east-1")
    after = find(merged, "aws", "g5.xlarge", "us-east-1")
    assert before.spot_price != after.spot_price and after.spot_price == 0.40
    assert any(s.endswith("aws/vms.csv") for s in merged.sources)


def test_missing_skypilot_dir_reads_nothing(tmp_path: Path) -> None:
    cat = Catalog()
    stats = read_skypilot_catalogs(cat, tmp_path / "none")
    assert cat.offerings == [] and not stats.offerings
