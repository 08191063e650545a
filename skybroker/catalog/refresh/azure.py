"""Azure GPU offerings from Azure's own APIs.

- azure-mgmt-compute `resource_skus.list` (paginated by nextLink): VM sizes per region with
  their vCPUs, MemoryGB and GPUs capabilities; sizes restricted for the subscription in
  a region are skipped there.
- Azure Retail Prices API over httpx (`https://prices.azure.com/api/retail/prices`,
  paginated by NextPageLink, no credentials): Linux pay-as-you-go and Spot $/h.

The GPU kind comes from the size name (the SKU API gives only a GPU count): see
`gpu_kind_of_size`. Throttling (HTTP 429) is retried here with backoff; the SDK's own
retries are off (`retry_total=0`) so the behaviour is the same for both APIs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from skybroker.catalog.refresh.common import FetchStats, finish, with_retries
from skybroker.catalog.schema import Offering

RETAIL_URL = "https://prices.azure.com/api/retail/prices"
RETAIL_API_VERSION = "2023-01-01-preview"
DEFAULT_REGIONS = ("eastus", "eastus2", "westus2", "westus3", "southcentralus", "westeurope")
# Size-name patterns -> GPU kind, first match wins (Azure names the GPU in the series).
_KINDS = [
    (re.compile(r"_T4_v3$"), "T4"),
    (re.compile(r"^Standard_NV\d+ad[m]?s_A10_v5$"), "A10"),
    (re.compile(r"^Standard_N[CD]\d+a[d]?[m]?s[r]?_A100_v4$"), "A100-80GB"),
    (re.compile(r"^Standard_ND96asr_v4$"), "A100"),
    (re.compile(r"_H100_v5$"), "H100"),
    (re.compile(r"_H200_v5$"), "H200"),
    (re.compile(r"_MI300X_v5$"), "MI300X"),
    (re.compile(r"^Standard_ND40rs_v2$"), "V100-32GB"),
    (re.compile(r"^Standard_NC\d+r?s_v3$"), "V100"),
]
FRACTIONAL_A10_MIN_VCPUS = 36  # NV6/12/18ads_A10_v5 get a slice of one A10
EXTRA_GPU_MEMORY_GIB = {"MI300X": 192.0}  # kinds the bundled gpus.csv does not list


def gpu_kind_of_size(size: str, vcpus: float = 0) -> str | None:
    """'Standard_NC24ads_A100_v4' -> 'A100-80GB'; None for sizes without a whole GPU."""
    for pattern, kind in _KINDS:
        if pattern.search(size):
            if kind == "A10" and vcpus < FRACTIONAL_A10_MIN_VCPUS:
                return None
            return kind
    return None


def is_throttle(err: Exception) -> bool:
    status = getattr(err, "status_code", None)
    if status is None and getattr(err, "response", None) is not None:
        status = getattr(err.response, "status_code", None)
    return status == 429


class RetailThrottled(RuntimeError):
    """HTTP 429 from the Retail Prices API (carries status_code for is_throttle)."""

    status_code = 429


def make_compute_client(subscription_id: str, credential: Any | None = None, **kwargs: Any) -> Any:
    from azure.mgmt.compute import ComputeManagementClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return ComputeManagementClient(credential, subscription_id, retry_total=0, **kwargs)


def vm_sizes(
    client: Any, region: str, stats: FetchStats, sleep: Callable[[float], None]
) -> dict[str, dict[str, float]]:
    """Unrestricted VM sizes in `region` -> {vcpus, memory_gib, gpus}."""
    sizes: dict[str, dict[str, float]] = {}
    token: str | None = None
    while True:

        def page(tok: str | None = token) -> tuple[list[Any], str | None]:
            pager = client.resource_skus.list(filter=f"location eq '{region}'").by_page(
                continuation_token=tok
            )
            return list(next(pager)), pager.continuation_token

        items, token = with_retries(
            page, is_throttle, stats, sleep=sleep, what="azure resourceSkus.list"
        )
        stats.pages += 1
        for sku in items:
            if sku.resource_type != "virtualMachines" or region not in [
                loc.lower() for loc in sku.locations or []
            ]:
                continue
            if any(r.type == "Location" or (r.restriction_info and region in (r.restriction_info.locations or []))
                   for r in sku.restrictions or []):  # fmt: skip
                continue
            caps = {c.name: c.value for c in sku.capabilities or []}
            try:
                gpus = float(caps.get("GPUs", 0))
                sizes[sku.name] = {
                    "vcpus": float(caps["vCPUs"]),
                    "memory_gib": float(caps["MemoryGB"]),
                    "gpus": gpus,
                }
            except (KeyError, ValueError):
                continue
        if not token:
            return sizes


def retail_prices(
    http: Any, region: str, stats: FetchStats, sleep: Callable[[float], None]
) -> dict[str, list[float | None]]:
    """armSkuName -> [on-demand, spot] Linux $/h in `region` from the Retail Prices API."""
    query = (
        f"serviceName eq 'Virtual Machines' and armRegionName eq '{region}' "
        "and priceType eq 'Consumption'"
    )
    url: str | None = RETAIL_URL
    params: dict[str, str] | None = {"api-version": RETAIL_API_VERSION, "$filter": query}
    prices: dict[str, list[float | None]] = {}
    while url:

        def get(u: str = url, p: dict[str, str] | None = params) -> dict[str, Any]:
            response = http.get(u, params=p)
            if response.status_code == 429:
                raise RetailThrottled(
                    f"retail prices: HTTP 429 ({response.headers.get('Retry-After', '?')} s)"
                )
            response.raise_for_status()
            return response.json()

        body = with_retries(get, is_throttle, stats, sleep=sleep, what="azure retail prices")
        stats.pages += 1
        for item in body.get("Items", []):
            sku_name = item.get("skuName", "")
            if "Windows" in item.get("productName", "") or "Low Priority" in sku_name:
                continue
            if item.get("unitOfMeasure") != "1 Hour" or item.get("type") != "Consumption":
                continue
            price = float(item.get("retailPrice") or 0) or None
            market = 1 if sku_name.endswith("Spot") else 0
            slot = prices.setdefault(item["armSkuName"], [None, None])
            if price is not None:
                slot[market] = price if slot[market] is None else min(slot[market], price)  # type: ignore[type-var]
        url, params = body.get("NextPageLink"), None  # the next link carries the query
    return prices


def fetch_azure(
    subscription_id: str,
    regions: list[str] | tuple[str, ...] = DEFAULT_REGIONS,
    *,
    compute_client: Any | None = None,
    http: Any | None = None,
    gpu_memory: dict[str, float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> tuple[list[Offering], FetchStats]:
    """GPU offerings in `regions` with Linux pay-as-you-go and Spot prices."""
    import httpx

    sleep = sleep or time.sleep
    client = compute_client or make_compute_client(subscription_id)
    own_http = http is None
    http = http or httpx.Client(timeout=60.0)
    gpu_memory = gpu_memory if gpu_memory is not None else _bundled_gpu_memory()
    stats = FetchStats()
    out: list[Offering] = []
    try:
        for region in regions:
            sizes = vm_sizes(client, region, stats, sleep)
            gpu_sizes = {
                name: s for name, s in sizes.items()
                if s["gpus"] >= 1 and gpu_kind_of_size(name, s["vcpus"])
            }  # fmt: skip
            prices = retail_prices(http, region, stats, sleep) if gpu_sizes else {}
            for name, s in sorted(gpu_sizes.items()):
                kind = gpu_kind_of_size(name, s["vcpus"])
                memory = gpu_memory.get(kind or "") or EXTRA_GPU_MEMORY_GIB.get(kind or "")
                if kind is None or memory is None:
                    continue
                price, spot = prices.get(name, [None, None])
                row = finish(
                    Offering(
                        cloud="azure", region=region, instance_type=name, gpu=kind,
                        gpu_count=int(s["gpus"]), gpu_memory_gib=memory,
                        vcpus=s["vcpus"], memory_gib=s["memory_gib"], price=price, spot_price=spot,
                    ),
                    stats,
                )  # fmt: skip
                if row is not None:
                    out.append(row)
    finally:
        if own_http:
            http.close()
    return out, stats


def _bundled_gpu_memory() -> dict[str, float]:
    from skybroker.catalog import load_catalog

    return {name: g.memory_gib for name, g in load_catalog().gpus.items()}
