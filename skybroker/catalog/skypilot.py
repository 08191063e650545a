"""Read SkyPilot's own catalog files (`vms.csv` per cloud) into catalog Offerings.

SkyPilot keeps them under `$SKY_RUNTIME_DIR/.sky/catalogs/<schema>/<cloud>/vms.csv`
(`$SKY_RUNTIME_DIR` defaults to `~`; schema `v8` for SkyPilot 0.14). Users who keep those
files fresh (`sky show-gpus` refreshes them) can plan on SkyPilot's prices.

Columns are read by name, so the per-cloud column orders all work (AWS, GCP, Azure,
Lambda, RunPod, ...). What this reader does with them:

- GPU rows only; one Offering per (instance type, region): on-demand = lowest over the
  region's zones (they agree in practice), spot = lowest over the zones.
- GCP prices a GPU VM in two rows: the host VM and the accelerator (empty InstanceType).
  Built-in hosts (a2, a3, a4, g2) map to their GPU as SkyPilot's gcp_catalog does;
  other accelerators (T4, V100, P100, P4) attach to an n1-standard host of 4 vCPUs per GPU
  priced from the same file (so `n1-standard-8` appears once per GPU it can carry: the
  offering key includes the GPU). Price = host + accelerator, on each market.
- A spot price above on-demand is dropped, a zero price is no price, and a row left with
  no price is dropped; each is counted and logged as a warning, never written as 0.
"""

from __future__ import annotations

import ast
import csv
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from skybroker.catalog.schema import Catalog, Offering

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "v8"  # sky.skylet.constants.CATALOG_SCHEMA_VERSION in SkyPilot 0.14
# SkyPilot accelerator names that are one of our GPU kinds under another spelling.
GPU_ALIASES = {
    "H100-SXM": "H100",
    "H100-80GB": "H100",
    "A100-80GB-SXM": "A100-80GB",
    "A100-SXM4": "A100",
    "RTXA6000": "A6000",
    "RTX6000-Ada": "RTX6000-Ada",
    "T4g": "T4",
}
# GCP hosts with the GPU built in -> (GPU kind, count): SkyPilot's _ACC_INSTANCE_TYPE_DICTS.
GCP_BUILTIN: dict[str, tuple[str, int]] = {
    **{f"a2-highgpu-{n}g": ("A100", n) for n in (1, 2, 4, 8)},
    "a2-megagpu-16g": ("A100", 16),
    **{f"a2-ultragpu-{n}g": ("A100-80GB", n) for n in (1, 2, 4, 8)},
    **{f"a3-highgpu-{n}g": ("H100", n) for n in (1, 2, 4, 8)},
    "a3-edgegpu-8g": ("H100", 8),
    "a3-megagpu-8g": ("H100-MEGA", 8),
    "a3-ultragpu-8g": ("H200", 8),
    "a4-highgpu-8g": ("B200", 8),
    **{f"g2-standard-{v}": ("L4", 1) for v in (4, 8, 12, 16, 32)},
    "g2-standard-24": ("L4", 2),
    "g2-standard-48": ("L4", 4),
    "g2-standard-96": ("L4", 8),
}
GCP_N1_VCPUS_PER_GPU = 4


def skypilot_catalog_dir(schema: str = SCHEMA_VERSION) -> Path:
    """Where SkyPilot keeps its catalog files: $SKY_RUNTIME_DIR/.sky/catalogs/<schema>."""
    root = Path(os.environ.get("SKY_RUNTIME_DIR", "~")).expanduser()
    return root / ".sky" / "catalogs" / schema


@dataclass
class ReadStats:
    """What the reader kept and dropped, per cloud (shown by `skybroker catalog info`)."""

    offerings: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dropped_no_price: int = 0
    dropped_spot_above_on_demand: int = 0
    skipped_no_host: int = 0


def _price(cell: str | None) -> float | None:
    """A price cell -> $/h, or None for empty, unparsable, zero or negative cells."""
    try:
        value = float(cell) if cell and cell.strip() else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _num(cell: str | None) -> float:
    try:
        return float(cell) if cell and cell.strip() else 0.0
    except ValueError:
        return 0.0


def gpu_memory_gib(gpu_info: str | None) -> float | None:
    """Per-GPU memory in GiB from SkyPilot's GpuInfo dict string.

    Uses Gpus[0].MemoryInfo.SizeInMiB (per GPU), not TotalGpuMemoryInMiB (Lambda puts the
    per-GPU figure there). Some clouds (RunPod) write GB into SizeInMiB: values under 1024
    are read as GiB.
    """
    if not gpu_info or not gpu_info.strip().startswith("{"):
        return None
    try:
        info = ast.literal_eval(gpu_info)
        size = float(info["Gpus"][0]["MemoryInfo"]["SizeInMiB"])
    except (ValueError, SyntaxError, KeyError, IndexError, TypeError):
        return None
    return round(size / 1024, 2) if size >= 1024 else size


@dataclass
class _Agg:
    """One (instance type, region) being aggregated over zones."""

    gpu: str
    count: int
    vcpus: float
    memory_gib: float
    gpu_mem: float | None
    price: float | None = None
    spot: float | None = None

    def add(self, price: float | None, spot: float | None) -> None:
        if price is not None:
            self.price = price if self.price is None else min(self.price, price)
        if spot is not None:
            self.spot = spot if self.spot is None else min(self.spot, spot)


def _lowest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _kind(name: str) -> str:
    return GPU_ALIASES.get(name, name)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _count(cell: str | None) -> int:
    return int(_num(cell))


def read_vms_csv(path: Path, cloud: str, catalog: Catalog, stats: ReadStats) -> list[Offering]:
    """One cloud's vms.csv -> Offerings (GCP's two-part pricing handled)."""
    rows = _rows(path)
    aggs = _gcp_aggregate(rows, stats) if cloud == "gcp" else _aggregate(rows)
    out = []
    for (itype, region, *_), a in sorted(aggs.items()):
        price, spot = a.price, a.spot
        if price is not None and spot is not None and spot > price:
            stats.dropped_spot_above_on_demand += 1
            spot = None
        if price is None and spot is None:
            stats.dropped_no_price += 1
            continue
        spec = catalog.gpus.get(a.gpu)
        gpu_mem = a.gpu_mem or (spec.memory_gib if spec else None)
        if gpu_mem is None:
            continue  # unknown GPU without memory figure: the planner could not size it
        out.append(
            Offering(
                cloud=cloud,
                region=region,
                instance_type=itype,
                gpu=a.gpu,
                gpu_count=a.count,
                gpu_memory_gib=gpu_mem,
                vcpus=a.vcpus,
                memory_gib=a.memory_gib,
                price=price,
                spot_price=spot,
            )
        )
        stats.offerings[cloud] += 1
    return out


def _is_gpu(name: str) -> bool:
    return bool(name) and not name.lower().startswith("tpu") and "inferentia" not in name.lower()


def _aggregate(rows: list[dict[str, str]]) -> dict[tuple, _Agg]:
    aggs: dict[tuple, _Agg] = {}
    for r in rows:
        name, itype = (
            (r.get("AcceleratorName") or "").strip(),
            (r.get("InstanceType") or "").strip(),
        )
        if not _is_gpu(name) or not itype or _count(r.get("AcceleratorCount")) < 1:
            continue
        key = (itype, (r.get("Region") or "").strip())
        if key not in aggs:
            aggs[key] = _Agg(
                _kind(name), _count(r.get("AcceleratorCount")), _num(r.get("vCPUs")),
                _num(r.get("MemoryGiB")), gpu_memory_gib(r.get("GpuInfo")),
            )  # fmt: skip
        aggs[key].add(_price(r.get("Price")), _price(r.get("SpotPrice")))
    return aggs


def _gcp_aggregate(rows: list[dict[str, str]], stats: ReadStats) -> dict[tuple, _Agg]:
    """GCP: host + accelerator per (host type, region)."""
    accel: dict[tuple[str, int, str], _Agg] = {}
    hosts: dict[tuple[str, str], _Agg] = {}
    for r in rows:
        itype, region = (r.get("InstanceType") or "").strip(), (r.get("Region") or "").strip()
        name = (r.get("AcceleratorName") or "").strip()
        price, spot = _price(r.get("Price")), _price(r.get("SpotPrice"))
        if not itype:
            if _is_gpu(name):
                key = (_kind(name), _count(r.get("AcceleratorCount")), region)
                a = accel.setdefault(
                    key, _Agg(key[0], key[1], 0, 0, gpu_memory_gib(r.get("GpuInfo")))
                )
                a.add(price, spot)
            continue
        h = hosts.setdefault(
            (itype, region), _Agg("", 0, _num(r.get("vCPUs")), _num(r.get("MemoryGiB")), None)
        )
        h.add(price, spot)
    out: dict[tuple, _Agg] = {}
    for (itype, region), h in hosts.items():
        if itype not in GCP_BUILTIN:
            continue
        gpu, count = GCP_BUILTIN[itype]
        a = accel.get((gpu, count, region))
        if a is None:
            stats.skipped_no_host += 1
            continue
        out[(itype, region, gpu, count)] = _combined(gpu, count, h, a)
    builtin_gpus = {g for g, _ in GCP_BUILTIN.values()}
    for (gpu, count, region), a in accel.items():
        if gpu in builtin_gpus:
            continue
        host_type = f"n1-standard-{GCP_N1_VCPUS_PER_GPU * count}"
        h = hosts.get((host_type, region))
        if h is None:
            stats.skipped_no_host += 1
            continue
        out[(host_type, region, gpu, count)] = _combined(gpu, count, h, a)
    return out


def _combined(gpu: str, count: int, host: _Agg, acc: _Agg) -> _Agg:
    """Host VM + accelerator on each market (a market needs both parts priced)."""
    both = _Agg(gpu, count, host.vcpus, host.memory_gib, acc.gpu_mem)
    if host.price is not None and acc.price is not None:
        both.price = round(host.price + acc.price, 5)
    if host.spot is not None and acc.spot is not None:
        both.spot = round(host.spot + acc.spot, 5)
    return both


def read_skypilot_catalogs(
    catalog: Catalog, directory: Path | None = None, clouds: list[str] | None = None
) -> ReadStats:
    """Merge every `<cloud>/vms.csv` under SkyPilot's catalog dir into `catalog`.

    A SkyPilot row replaces a bundled row with the same (cloud, region, zone, instance
    type). Missing directory or files are not an error: nothing is read.
    """
    from skybroker.catalog.loader import merge_offerings

    directory = directory or skypilot_catalog_dir()
    stats = ReadStats()
    if not directory.is_dir():
        logger.info("no SkyPilot catalog at %s", directory)
        return stats
    for path in sorted(directory.glob("*/vms.csv")):
        cloud = path.parent.name.lower()
        if clouds and cloud not in clouds:
            continue
        merge_offerings(catalog, read_vms_csv(path, cloud, catalog, stats))
        catalog.sources.append(str(path))
    if stats.dropped_no_price or stats.dropped_spot_above_on_demand:
        logger.warning(
            "SkyPilot catalog: dropped %d rows without a price, %d spot prices above on-demand",
            stats.dropped_no_price,
            stats.dropped_spot_above_on_demand,
        )
    return stats
