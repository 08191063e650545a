"""AWS GPU offerings from AWS's own APIs (boto3).

- EC2 `describe_instance_types` (paginated) per region: vCPUs, RAM and GpuInfo.
- Pricing `get_products` (us-east-1 endpoint, paginated by NextToken): on-demand Linux,
  shared tenancy, no pre-installed software, capacity "Used" per region.
- EC2 `describe_spot_price_history` (paginated, Linux/UNIX, latest): lowest over the AZs.

Clients are made with botocore's own retries off so that throttling (Throttling,
ThrottlingException, RequestLimitExceeded, TooManyRequestsException) is retried here with
backoff and surfaced as ThrottledError when it persists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from skybroker.catalog.refresh.common import FetchStats, finish, gpu_kind, with_retries
from skybroker.catalog.schema import Offering

THROTTLE_CODES = {
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestThrottled", "SlowDown",
}  # fmt: skip
DEFAULT_REGIONS = (
    "us-east-1",
    "us-east-2",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-northeast-1",
)
PRICING_REGION = "us-east-1"
GPU_FAMILIES = ["g*", "p*"]  # every EC2 GPU family starts with g or p (and no CPU family does)


def is_throttle(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return code in THROTTLE_CODES


def make_clients(session: Any | None = None) -> tuple[Callable[[str], Any], Any]:
    """(ec2_for_region, pricing) clients with botocore retries off (we retry ourselves)."""
    import boto3
    from botocore.config import Config

    session = session or boto3.session.Session()
    config = Config(retries={"max_attempts": 1, "mode": "standard"})

    def ec2(region: str) -> Any:
        return session.client("ec2", region_name=region, config=config)

    return ec2, session.client("pricing", region_name=PRICING_REGION, config=config)


def _pages(client: Any, method: str, stats: FetchStats, token_in: str, token_out: str,
           sleep: Callable[[float], None], **kwargs: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Call `method` following `token_out` -> `token_in` until it is absent."""
    pages = []
    token: str | None = None
    while True:
        args = dict(kwargs, **({token_in: token} if token else {}))
        page = with_retries(
            lambda a=args: getattr(client, method)(**a), is_throttle, stats,
            sleep=sleep, what=f"aws {method}",
        )  # fmt: skip
        stats.pages += 1
        pages.append(page)
        token = page.get(token_out)
        if not token:
            return pages


def gpu_instance_types(
    ec2: Any, stats: FetchStats, sleep: Callable[[float], None]
) -> dict[str, dict[str, Any]]:
    """instance type -> {gpu, count, gpu_mem_gib, vcpus, memory_gib} for GPU types."""
    out = {}
    pages = _pages(ec2, "describe_instance_types", stats, "NextToken", "NextToken", sleep,
                   Filters=[{"Name": "instance-type", "Values": GPU_FAMILIES}])  # fmt: skip
    for page in pages:
        for it in page.get("InstanceTypes", []):
            gpus = (it.get("GpuInfo") or {}).get("Gpus") or []
            if not gpus or sum(g.get("Count", 0) for g in gpus) < 1:
                continue  # no GPU, or a fractional one (g6f): not an inference offering
            per_gpu_gib = round(gpus[0]["MemoryInfo"]["SizeInMiB"] / 1024, 2)
            out[it["InstanceType"]] = {
                "gpu": gpu_kind(gpus[0]["Name"], per_gpu_gib),
                "count": sum(g["Count"] for g in gpus),
                "gpu_mem_gib": per_gpu_gib,
                "vcpus": float(it["VCpuInfo"]["DefaultVCpus"]),
                "memory_gib": round(it["MemoryInfo"]["SizeInMiB"] / 1024, 2),
            }
    return out


def on_demand_prices(
    pricing: Any, region: str, stats: FetchStats, sleep: Callable[[float], None]
) -> dict[str, float]:
    """instance type -> on-demand $/h (Linux, shared tenancy) in `region`."""
    filters = [
        {"Type": "TERM_MATCH", "Field": f, "Value": v}
        for f, v in (
            ("regionCode", region), ("operatingSystem", "Linux"), ("tenancy", "Shared"),
            ("preInstalledSw", "NA"), ("capacitystatus", "Used"),
            ("productFamily", "Compute Instance"),
        )
    ]  # fmt: skip
    prices: dict[str, float] = {}
    pages = _pages(pricing, "get_products", stats, "NextToken", "NextToken", sleep,
                   ServiceCode="AmazonEC2", Filters=filters, FormatVersion="aws_v1")  # fmt: skip
    for page in pages:
        for raw in page.get("PriceList", []):
            item = json.loads(raw) if isinstance(raw, str) else raw
            itype = item.get("product", {}).get("attributes", {}).get("instanceType")
            usd = _usd_per_hour(item)
            if itype and usd:
                prices[itype] = min(usd, prices.get(itype, usd))
    return prices


def _usd_per_hour(item: dict[str, Any]) -> float | None:
    for term in item.get("terms", {}).get("OnDemand", {}).values():
        for dim in term.get("priceDimensions", {}).values():
            if dim.get("unit") in ("Hrs", "Hours"):
                try:
                    value = float(dim["pricePerUnit"]["USD"])
                except (KeyError, ValueError):
                    continue
                if value > 0:
                    return value
    return None


def spot_prices(
    ec2: Any, types: list[str], stats: FetchStats, sleep: Callable[[float], None]
) -> dict[str, float]:
    """instance type -> lowest current spot $/h over the region's AZs."""
    if not types:
        return {}
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    pages = _pages(ec2, "describe_spot_price_history", stats, "NextToken", "NextToken", sleep,
                   InstanceTypes=types, ProductDescriptions=["Linux/UNIX"],
                   StartTime=datetime.now(UTC))  # fmt: skip
    for page in pages:
        for h in page.get("SpotPriceHistory", []):
            key = (h["InstanceType"], h.get("AvailabilityZone", ""))
            stamp = h.get("Timestamp") or datetime.min.replace(tzinfo=UTC)
            if key not in latest or stamp > latest[key][0]:
                latest[key] = (stamp, float(h["SpotPrice"]))
    out: dict[str, float] = {}
    for (itype, _), (_, price) in latest.items():
        out[itype] = min(price, out.get(itype, price))
    return out


def fetch_aws(
    regions: list[str] | tuple[str, ...] = DEFAULT_REGIONS,
    *,
    session: Any | None = None,
    clients: tuple[Callable[[str], Any], Any] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> tuple[list[Offering], FetchStats]:
    """GPU offerings of `regions` with on-demand and spot prices."""
    import time

    sleep = sleep or time.sleep
    ec2_for, pricing = clients or make_clients(session)
    stats = FetchStats()
    out: list[Offering] = []
    for region in regions:
        ec2 = ec2_for(region)
        types = gpu_instance_types(ec2, stats, sleep)
        on_demand = on_demand_prices(pricing, region, stats, sleep)
        spot = spot_prices(ec2, sorted(types), stats, sleep)
        for itype, t in sorted(types.items()):
            row = finish(
                Offering(
                    cloud="aws", region=region, instance_type=itype, gpu=t["gpu"],
                    gpu_count=t["count"], gpu_memory_gib=t["gpu_mem_gib"], vcpus=t["vcpus"],
                    memory_gib=t["memory_gib"], price=on_demand.get(itype),
                    spot_price=spot.get(itype),
                ),
                stats,
            )  # fmt: skip
            if row is not None:
                out.append(row)
    return out, stats
