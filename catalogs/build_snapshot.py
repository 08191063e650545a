"""Build the bundled snapshot (offerings.csv, gpus.csv, regions.csv, egress.csv, sources.csv).

Run from the repository root:

    python catalogs/build_snapshot.py --reference ../shared/reference

Inputs: the hand-transcribed SkyPilot catalog extracts in the reference folder (AWS, GCP,
Lambda; see catalogs/README.md for their origin) plus the tables in `catalogs/data.py`
(Azure, RunPod, AWS families missing from the extract, GPU specs, region locations, egress).
What this script does to the figures (all documented in catalogs/README.md):

- GCP: a GPU VM costs host VM + accelerator. a2/a3 hosts come from the host-VM extract; n1
  hosts (T4, V100) and g2 hosts (L4) are priced from GCP's us-central1 per-vCPU / per-GiB
  rates scaled by the region's a2 host price ratio (an estimate, flagged in the README).
  Accelerator prices are linear in the GPU count where a count row is missing.
- GCP on-demand prices that are below the same row's spot price, or below half the highest
  on-demand price of the same (GPU, count) across regions, are placeholders (DWS/flex-start
  figures repeated across regions): the on-demand price is dropped, the spot price kept.
- Any spot price above on-demand is dropped (never kept blindly); rows left with no price are
  dropped. GPU kinds without a spec row (B300, Gaudi, T4g on Arm) are left out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402  (catalogs/data.py: the hand-entered tables)

OFFERING_HEADER = [
    "cloud", "region", "zone", "instance_type", "gpu", "gpu_count", "gpu_memory_gib",
    "vcpus", "memory_gib", "price", "spot_price",
]  # fmt: skip

Row = dict[str, object]


def _f(value: str) -> float | None:
    return float(value) if value.strip() else None


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def offering(
    cloud: str, region: str, itype: str, gpu: str, count: int, vcpus: float, mem: float,
    price: float | None, spot: float | None, gpu_mem: float | None = None,
) -> Row:  # fmt: skip
    """One offerings.csv row; per-GPU memory from the source, else the GPU spec table."""
    return {
        "cloud": cloud, "region": region, "zone": "", "instance_type": itype, "gpu": gpu,
        "gpu_count": count, "gpu_memory_gib": gpu_mem or data.GPU_MEMORY_GIB[gpu], "vcpus": vcpus,
        "memory_gib": mem, "price": price, "spot_price": spot,
    }  # fmt: skip


def simple_cloud(ref: Path, name: str) -> list[Row]:
    """AWS and Lambda extracts: one row per (instance type, region), prices as listed."""
    out = []
    for r in _read(ref / f"catalog-{name}.csv"):
        gpu = r["accelerator"]
        if gpu not in data.GPU_MEMORY_GIB:
            continue  # no spec row (B300, Gaudi, Arm T4g): the planner could not use it
        out.append(
            offering(
                name,
                r["region"],
                r["instance_type"],
                gpu,
                int(r["accelerator_count"]),
                float(r["vcpus"]),
                float(r["memory_gib"]),
                _f(r["price_per_hour"]),
                _f(r["spot_price_per_hour"]),
                _f(r["gpu_memory_gib"]),
            )
        )
    return out


def gcp_accelerators(ref: Path) -> dict[tuple[str, int, str], tuple[float | None, float | None]]:
    """(gpu, count, region) -> (on-demand, spot) of the accelerator alone, traps handled."""
    rows = [r for r in _read(ref / "catalog-gcp.csv") if r["row_kind"] == "accelerator_only"]
    top: dict[tuple[str, int], float] = defaultdict(float)
    for r in rows:
        price = _f(r["price_per_hour"])
        if price is not None:
            key = (r["accelerator"], int(r["accelerator_count"]))
            top[key] = max(top[key], price)
    out = {}
    for r in rows:
        gpu, count = r["accelerator"], int(r["accelerator_count"])
        price, spot = _f(r["price_per_hour"]), _f(r["spot_price_per_hour"])
        if price is not None and (
            (spot is not None and price < spot) or price < 0.5 * top[(gpu, count)]
        ):
            price = None  # placeholder on-demand figure (see module docstring)
        out[(gpu, count, r["region"])] = (price, spot)
    return out


def _accel(
    acc: dict[tuple[str, int, str], tuple[float | None, float | None]],
    gpu: str,
    count: int,
    region: str,
) -> tuple[float | None, float | None] | None:
    """Accelerator price of `count` GPUs, linear from another count's row when missing."""
    if (gpu, count, region) in acc:
        return acc[(gpu, count, region)]
    for other in (1, 2, 4, 8, 16):
        if (gpu, other, region) in acc:
            price, spot = acc[(gpu, other, region)]
            scale = count / other
            return (
                None if price is None else price * scale,
                None if spot is None else spot * scale,
            )
    return None


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a + b, 5)


def gcp(ref: Path) -> list[Row]:
    """GCP GPU VMs: host VM + accelerator, per region."""
    acc = gcp_accelerators(ref)
    hosts = _read(ref / "catalog-gcp-gpu-host-vms.csv")
    out: list[Row] = []
    for h in hosts:
        gpu, count = data.GCP_BUILTIN_GPU[h["instance_type"]]
        a = _accel(acc, gpu, count, h["region"])
        if a is None:
            continue
        price = _add(_f(h["vm_price_per_hour_excl_gpu"]), a[0])
        spot = _add(_f(h["vm_spot_price_per_hour_excl_gpu"]), a[1])
        out.append(
            offering(
                "gcp",
                h["region"],
                h["instance_type"],
                gpu,
                count,
                float(h["vcpus"]),
                float(h["memory_gib"]),
                price,
                spot,
            )
        )
    out += gcp_estimated_hosts(acc, hosts)
    return out


def _region_factor(hosts: list[dict[str, str]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per region: host-price level vs us-central1, and host spot/on-demand ratio (medians
    over the a2/a3 host rows)."""
    by_type: dict[str, dict[str, float]] = defaultdict(dict)
    spot_ratios: dict[str, list[float]] = defaultdict(list)
    for h in hosts:
        price = float(h["vm_price_per_hour_excl_gpu"])
        by_type[h["instance_type"]][h["region"]] = price
        spot = _f(h["vm_spot_price_per_hour_excl_gpu"])
        if spot is not None:
            spot_ratios[h["region"]].append(spot / price)
    ratios: dict[str, list[float]] = defaultdict(list)
    for prices in by_type.values():
        if "us-central1" in prices:
            for region, p in prices.items():
                ratios[region].append(p / prices["us-central1"])
    level = {region: statistics.median(rs) for region, rs in ratios.items()}
    spot = {region: statistics.median(rs) for region, rs in spot_ratios.items()}
    return level, spot


def gcp_estimated_hosts(
    acc: dict[tuple[str, int, str], tuple[float | None, float | None]],
    hosts: list[dict[str, str]],
) -> list[Row]:
    """GPU VMs whose host price is estimated: n1 + T4/V100, g2 + L4, a3-mega/ultra, a4."""
    factor, spot_ratio = _region_factor(hosts)
    out: list[Row] = []
    regions = sorted({k[2] for k in acc})
    for host in data.GCP_ESTIMATED_HOSTS:
        for region in regions:
            a = _accel(acc, host.gpu, host.count, region)
            if a is None or ((host.gpu, 1, region) not in acc and (
                host.gpu, host.count, region) not in acc):  # fmt: skip
                continue
            f = factor.get(region)
            if f is None or region not in spot_ratio:
                continue  # no host-price level known for this region
            on_demand = host.vcpus * host.vcpu_rate + host.memory_gib * host.mem_rate
            price = _add(round(on_demand * f, 5), a[0])
            spot = _add(round(on_demand * f * spot_ratio[region], 5), a[1])
            out.append(
                offering(
                    "gcp",
                    region,
                    host.instance_type,
                    host.gpu,
                    host.count,
                    host.vcpus,
                    host.memory_gib,
                    price,
                    spot,
                )
            )
    return out


def table(rows: list[tuple], cloud: str) -> list[Row]:
    """Hand-entered (instance, gpu, count, vcpus, mem, price, spot, regions) tuples -> rows."""
    out = []
    for itype, gpu, count, vcpus, mem, price, spot, regions in rows:
        for region in regions:
            out.append(offering(cloud, region, itype, gpu, count, vcpus, mem, price, spot))
    return out


def clean(rows: list[Row]) -> tuple[list[Row], list[str]]:
    """Drop spot above on-demand and rows with no price; dedupe; report what was done."""
    notes: list[str] = []
    seen: set[tuple] = set()
    out = []
    for r in rows:
        key = (r["cloud"], r["region"], r["zone"], r["instance_type"])
        if key in seen:
            notes.append(f"duplicate {key} dropped")
            continue
        seen.add(key)
        price, spot = r["price"], r["spot_price"]
        if price is not None and spot is not None and spot > price:  # type: ignore[operator]
            notes.append(f"spot {spot} > on-demand {price} for {key}: spot dropped")
            r["spot_price"] = None
        if r["price"] is None and r["spot_price"] is None:
            notes.append(f"no price for {key}: row dropped")
            continue
        out.append(r)
    return out, notes


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.5f}".rstrip("0").rstrip(".")
    return str(v)


def write(path: Path, header: list[str], rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in header])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    ref: Path = args.reference
    rows = simple_cloud(ref, "aws") + table(data.AWS_EXTRA, "aws")
    rows += gcp(ref)
    rows += simple_cloud(ref, "lambda")
    rows += table(data.AZURE, "azure")  # type: ignore[arg-type]
    rows += table(data.RUNPOD, "runpod")
    rows, notes = clean(rows)
    rows.sort(key=lambda r: (r["cloud"], r["gpu"], r["gpu_count"], r["instance_type"], r["region"]))
    write(args.out / "offerings.csv", OFFERING_HEADER, rows)
    used = {(r["cloud"], r["region"]) for r in rows}
    regions = [r for r in data.region_rows() if (r["cloud"], r["region"]) in used]
    missing = used - {(r["cloud"], r["region"]) for r in regions}
    if missing:
        raise SystemExit(f"regions without a location: {sorted(missing)}")
    write(args.out / "regions.csv", list(data.REGION_HEADER), regions)
    kinds = {r["gpu"] for r in rows}
    write(
        args.out / "gpus.csv",
        list(data.GPU_HEADER),
        [g for g in data.gpu_rows() if g["name"] in kinds],
    )
    write(args.out / "egress.csv", list(data.EGRESS_HEADER), data.egress_rows())
    write(args.out / "sources.csv", list(data.SOURCE_HEADER), data.source_rows())
    print(f"{len(rows)} offerings, {len(regions)} regions, {len(kinds)} GPU kinds")
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
