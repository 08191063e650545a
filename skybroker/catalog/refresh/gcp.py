"""GCP GPU offerings from GCP's own APIs (google-cloud-compute, google-cloud-billing).

- Compute `MachineTypesClient.aggregated_list`: machine types per zone (vCPUs, RAM, and the
  built-in accelerators of a2/a3/a4/g2 hosts).
- Compute `AcceleratorTypesClient.aggregated_list`: attachable GPUs per zone (T4, V100,
  P100, P4 on n1 hosts) and their maximum count.
- Cloud Billing `CloudCatalogClient.list_skus` for Compute Engine: per-region hourly prices
  of GPUs, vCPUs and RAM by machine family, on demand and spot ("Preemptible").

A GPU VM costs vCPUs x core price + GiB x RAM price (of its family) + GPUs x GPU price:
that is how GCP bills it. Pages are read one at a time (`page_token`), each call retried
here on 429 / RESOURCE_EXHAUSTED with backoff (the clients' own retries are off).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from skybroker.catalog.refresh.common import FetchStats, finish, with_retries
from skybroker.catalog.schema import Offering

COMPUTE_SERVICE = "services/6F81-5844-456A"  # Compute Engine in the Cloud Billing catalog
ATTACHABLE_HOST = "n1-standard-{vcpus}"  # SkyPilot-style host: 4 vCPUs per attached GPU
VCPUS_PER_GPU = 4
OLD_GPU_MEMORY_GIB = {"P100": 16.0, "P4": 8.0}  # kinds the bundled gpus.csv does not list
# Accelerator type names (compute API) -> GPU kind.
ACCELERATOR_KINDS = {
    "nvidia-tesla-t4": "T4", "nvidia-tesla-v100": "V100", "nvidia-tesla-p100": "P100",
    "nvidia-tesla-p4": "P4", "nvidia-l4": "L4", "nvidia-tesla-a100": "A100",
    "nvidia-a100-80gb": "A100-80GB", "nvidia-h100-80gb": "H100",
    "nvidia-h100-mega-80gb": "H100-MEGA", "nvidia-h200-141gb": "H200", "nvidia-b200": "B200",
}  # fmt: skip
# Billing SKU description words that mark prices other than plain on-demand/spot.
SKIP_WORDS = ("Commitment", "Custom", "Sole Tenancy", "Reserved", "DWS", "Flex", "Calendar",
              "Extended", "Premium", "Licensing", "Windows")  # fmt: skip
_GPU_SKU = re.compile(
    r"Nvidia (?:Tesla )?(?P<name>[A-Z]\d+[A-Z]?)(?: (?P<mem>\d+)GB)?(?P<mega> Mega)? GPU"
)
_HOST_SKU = re.compile(r"^(?P<family>[A-Z]\d+[A-Z]?)(?: Predefined)? Instance (?P<part>Core|Ram)\b")


def is_throttle(err: Exception) -> bool:
    from google.api_core import exceptions

    return isinstance(err, exceptions.TooManyRequests | exceptions.ResourceExhausted)


def make_clients(credentials: Any | None = None) -> tuple[Any, Any, Any]:
    """(machine types, accelerator types, billing catalog) clients over REST."""
    from google.cloud import billing_v1, compute_v1

    return (
        compute_v1.MachineTypesClient(credentials=credentials, transport="rest"),
        compute_v1.AcceleratorTypesClient(credentials=credentials, transport="rest"),
        billing_v1.CloudCatalogClient(credentials=credentials, transport="rest"),
    )


def _pages(call: Callable[[str], Any], stats: FetchStats, sleep: Callable[[float], None],
           what: str) -> Iterator[Any]:  # fmt: skip
    """Yield each page's response; `call(token)` returns a pager whose first page we take."""
    token = ""
    while True:
        page = with_retries(
            lambda t=token: next(iter(call(t).pages)), is_throttle, stats, sleep=sleep, what=what
        )
        stats.pages += 1
        yield page
        token = page.next_page_token
        if not token:
            return


def _region(zone: str) -> str:
    return zone.split("/")[-1].rsplit("-", 1)[0]


@dataclass
class Prices:
    """Billing catalog prices per region: [on-demand, spot] $/h."""

    gpu: dict[tuple[str, str], list[float | None]] = field(default_factory=dict)  # (kind, region)
    core: dict[tuple[str, str], list[float | None]] = field(
        default_factory=dict
    )  # (family, region)
    ram: dict[tuple[str, str], list[float | None]] = field(default_factory=dict)  # $/GiB-h


def _unit_price(sku: Any) -> float | None:
    try:
        rate = sku.pricing_info[0].pricing_expression.tiered_rates[-1].unit_price
    except (IndexError, AttributeError):
        return None
    value = int(rate.units) + rate.nanos / 1e9
    return value if value > 0 else None


def gpu_sku_kind(description: str) -> str | None:
    """'Nvidia Tesla A100 80GB GPU running in Americas' -> 'A100-80GB'."""
    m = _GPU_SKU.search(description)
    if not m:
        return None
    name, mem = m["name"], int(m["mem"] or 0)
    if m["mega"]:
        return f"{name}-MEGA"
    if name == "A100" and mem >= 80:
        return "A100-80GB"
    return name


def parse_skus(skus: list[Any]) -> Prices:
    """Billing SKUs -> GPU, core and RAM prices per region and market."""
    prices = Prices()
    for sku in skus:
        desc = sku.description.removeprefix("Spot Preemptible ")
        usage = sku.category.usage_type
        if usage not in ("OnDemand", "Preemptible") or any(w in desc for w in SKIP_WORDS):
            continue
        market = 0 if usage == "OnDemand" else 1
        price = _unit_price(sku)
        if price is None:
            continue
        if (kind := gpu_sku_kind(desc)) is not None:
            table, key = prices.gpu, kind
        elif m := _HOST_SKU.match(desc):
            table, key = (prices.core if m["part"] == "Core" else prices.ram), m["family"]
        else:
            continue
        for region in sku.service_regions:
            table.setdefault((key, region), [None, None])[market] = price
    return prices


@dataclass
class Host:
    name: str
    vcpus: int
    memory_gib: float
    gpu: str | None  # built-in GPU kind
    count: int


def _family(machine_type: str) -> str:
    return machine_type.split("-")[0].upper()


def _price(host: Host, gpu: str, count: int, region: str, p: Prices, market: int) -> float | None:
    family = _family(host.name)
    parts = (
        p.core.get((family, region), [None, None])[market],
        p.ram.get((family, region), [None, None])[market],
        p.gpu.get((gpu, region), [None, None])[market],
    )
    if any(x is None for x in parts):
        return None
    core, ram, per_gpu = parts
    return round(host.vcpus * core + host.memory_gib * ram + count * per_gpu, 5)  # type: ignore[operator]


def fetch_gcp(
    project: str,
    regions: list[str] | None = None,
    *,
    clients: tuple[Any, Any, Any] | None = None,
    gpu_memory: dict[str, float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> tuple[list[Offering], FetchStats]:
    """GPU offerings of `project`'s visible zones (optionally only `regions`)."""
    sleep = sleep or time.sleep
    machines, accels, billing = clients or make_clients()
    gpu_memory = gpu_memory if gpu_memory is not None else _bundled_gpu_memory()
    stats = FetchStats()
    hosts: dict[str, dict[str, Host]] = defaultdict(dict)  # region -> name -> Host
    for page in _pages(
        lambda t: machines.aggregated_list(request={"project": project, "page_token": t}, retry=None),
        stats, sleep, "gcp machineTypes.aggregatedList",
    ):  # fmt: skip
        for zone, scoped in page.items.items():
            for mt in scoped.machine_types:
                acc = mt.accelerators[0] if mt.accelerators else None
                hosts[_region(zone)][mt.name] = Host(
                    mt.name, mt.guest_cpus, round(mt.memory_mb / 1024, 2),
                    ACCELERATOR_KINDS.get(acc.guest_accelerator_type) if acc else None,
                    acc.guest_accelerator_count if acc else 0,
                )  # fmt: skip
    attachable: dict[str, dict[str, int]] = defaultdict(dict)  # region -> kind -> max cards
    for page in _pages(
        lambda t: accels.aggregated_list(request={"project": project, "page_token": t}, retry=None),
        stats, sleep, "gcp acceleratorTypes.aggregatedList",
    ):  # fmt: skip
        for zone, scoped in page.items.items():
            for at in scoped.accelerator_types:
                kind = ACCELERATOR_KINDS.get(at.name)
                if kind:
                    region = _region(zone)
                    attachable[region][kind] = max(
                        attachable[region].get(kind, 0), at.maximum_cards_per_instance
                    )
    skus: list[Any] = []
    for page in _pages(
        lambda t: billing.list_skus(request={"parent": COMPUTE_SERVICE, "page_token": t}, retry=None),
        stats, sleep, "gcp cloudbilling.listSkus",
    ):  # fmt: skip
        skus.extend(page.skus)
    prices = parse_skus(skus)
    builtin = {h.gpu for hs in hosts.values() for h in hs.values() if h.gpu}
    out: list[Offering] = []
    for region in sorted(hosts):
        if regions and region not in regions:
            continue
        combos = [(h, h.gpu, h.count) for h in hosts[region].values() if h.gpu]
        for kind, max_cards in attachable.get(region, {}).items():
            if kind in builtin:
                continue  # a2/a3/g2-only GPUs come with their host above
            for count in (1, 2, 4, 8):
                host = hosts[region].get(ATTACHABLE_HOST.format(vcpus=VCPUS_PER_GPU * count))
                if count <= max_cards and host is not None:
                    combos.append((host, kind, count))
        for host, kind, count in sorted(combos, key=lambda c: (c[1], c[2], c[0].name)):
            memory = gpu_memory.get(kind) or OLD_GPU_MEMORY_GIB.get(kind)
            if memory is None:
                continue  # unknown GPU kind: the planner could not size it
            row = finish(
                Offering(
                    cloud="gcp", region=region, instance_type=host.name, gpu=kind,
                    gpu_count=count, gpu_memory_gib=memory,
                    vcpus=float(host.vcpus), memory_gib=host.memory_gib,
                    price=_price(host, kind, count, region, prices, 0),
                    spot_price=_price(host, kind, count, region, prices, 1),
                ),
                stats,
            )  # fmt: skip
            if row is not None:
                out.append(row)
    return out, stats


def _bundled_gpu_memory() -> dict[str, float]:
    from skybroker.catalog import load_catalog

    return {name: g.memory_gib for name, g in load_catalog().gpus.items()}
