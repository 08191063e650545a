"""GCP refresher offline: recorded REST JSON replayed through the real google-cloud clients
(their REST transport's HTTP session is replaced by one that serves the recordings)."""

from __future__ import annotations

import json
import logging

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import billing_v1, compute_v1

from skybroker.catalog.refresh import ThrottledError
from skybroker.catalog.refresh.gcp import fetch_gcp, gpu_sku_kind

PROJECT = "demo-project"


def zone_items(key: str, zone: str, rows: list[dict]) -> dict:
    return {f"zones/{zone}": {key: [dict(r, zone=zone) for r in rows]}}


MACHINES_PAGE1 = {
    "items": {
        **zone_items("machineTypes", "us-central1-a", [
            {"name": "n1-standard-4", "guestCpus": 4, "memoryMb": 15360},
            {"name": "n1-standard-8", "guestCpus": 8, "memoryMb": 30720},
            {"name": "a2-highgpu-1g", "guestCpus": 12, "memoryMb": 87040,
             "accelerators": [{"guestAcceleratorType": "nvidia-tesla-a100", "guestAcceleratorCount": 1}]},
        ]),
    },
    "nextPageToken": "m2",
}  # fmt: skip
MACHINES_PAGE2 = {
    "items": zone_items("machineTypes", "europe-west4-a", [
        {"name": "g2-standard-4", "guestCpus": 4, "memoryMb": 16384,
         "accelerators": [{"guestAcceleratorType": "nvidia-l4", "guestAcceleratorCount": 1}]},
        {"name": "n1-standard-4", "guestCpus": 4, "memoryMb": 15360},
    ]),
}  # fmt: skip
ACCELERATORS = {
    "items": {
        **zone_items("acceleratorTypes", "us-central1-a", [
            {"name": "nvidia-tesla-t4", "maximumCardsPerInstance": 4},
            {"name": "nvidia-tesla-a100", "maximumCardsPerInstance": 16},
        ]),
        **zone_items("acceleratorTypes", "europe-west4-a", [
            {"name": "nvidia-tesla-t4", "maximumCardsPerInstance": 4},
            {"name": "nvidia-l4", "maximumCardsPerInstance": 8},
        ]),
    }
}  # fmt: skip


def sku(
    desc: str, regions: list[str], usd: float, usage: str = "OnDemand", unit: str = "h"
) -> dict:
    units, nanos = int(usd), round((usd - int(usd)) * 1e9)
    group = "GPU" if "GPU" in desc else "CPU" if "Core" in desc else "RAM"
    return {
        "name": f"services/6F81-5844-456A/skus/{abs(hash((desc, usage))) % 10**8}",
        "description": desc,
        "category": {"serviceDisplayName": "Compute Engine", "resourceFamily": "Compute",
                     "resourceGroup": group, "usageType": usage},
        "serviceRegions": regions,
        "pricingInfo": [{"pricingExpression": {"usageUnit": unit, "tieredRates": [
            {"startUsageAmount": 0, "unitPrice": {"currencyCode": "USD", "units": str(units), "nanos": nanos}}]}}],
    }  # fmt: skip


US, EU = ["us-central1"], ["europe-west4"]
SKUS_PAGE1 = {
    "skus": [
        sku("N1 Predefined Instance Core running in Americas", US, 0.031611),
        sku("N1 Predefined Instance Ram running in Americas", US, 0.004237, unit="GiBy.h"),
        sku("Spot Preemptible N1 Predefined Instance Core running in Americas", US, 0.00698, "Preemptible"),
        sku("Spot Preemptible N1 Predefined Instance Ram running in Americas", US, 0.000936, "Preemptible", "GiBy.h"),
        sku("Nvidia Tesla T4 GPU running in Americas", US, 0.35),
        sku("Spot Preemptible Nvidia Tesla T4 GPU running in Americas", US, 0.1915, "Preemptible"),
        sku("Commitment v1: Nvidia Tesla T4 GPU running in Americas for 1 Year", US, 0.22, "Commit1Yr"),
    ],
    "nextPageToken": "s2",
}  # fmt: skip
SKUS_PAGE2 = {
    "skus": [
        sku("A2 Instance Core running in Americas", US, 0.031611),
        sku("A2 Instance Ram running in Americas", US, 0.004237, unit="GiBy.h"),
        sku("Nvidia Tesla A100 GPU running in Americas", US, 2.933908),
        sku("G2 Instance Core running in EMEA", EU, 0.0275),
        sku("G2 Instance Ram running in EMEA", EU, 0.00322, unit="GiBy.h"),
        sku("Nvidia L4 GPU running in EMEA", EU, 0.61666),
        sku("Spot Preemptible Nvidia L4 GPU running in EMEA", EU, 0.2698, "Preemptible"),
        # europe-west4 has T4s and n1 hosts but no N1 price here: those rows have no price.
        sku("Nvidia Tesla T4 GPU running in EMEA", EU, 0.35),
    ],
}  # fmt: skip


def _response(payload: dict, url: str, status: int = 200) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = json.dumps(payload).encode()
    r.headers["Content-Type"] = "application/json"
    r.url = url
    r.request = requests.Request("GET", url).prepare()
    return r


THROTTLED = {"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"}}


class ReplaySession:
    """Stands in for the REST transport's AuthorizedSession: serves recorded pages by
    (URL suffix, pageToken), optionally answering 429 first `throttle` times."""

    def __init__(self, pages: dict[tuple[str, str], dict], throttle: int = 0) -> None:
        self.pages, self.throttle, self.calls = pages, throttle, []

    def get(self, url: str, timeout=None, headers=None, params=None, **_: object):
        token = dict(params or []).get("pageToken", "")
        self.calls.append((url, token))
        if self.throttle:
            self.throttle -= 1
            return _response(THROTTLED, url, 429)
        for (suffix, tok), payload in self.pages.items():
            if url.endswith(suffix) and tok == token:
                return _response(payload, url)
        raise AssertionError(f"unexpected request {url} {token!r}")


TRANSPORTS = (
    compute_v1.services.machine_types.transports.rest,
    compute_v1.services.accelerator_types.transports.rest,
    billing_v1.services.cloud_catalog.transports.rest,
)


def clients(throttle: int = 0) -> tuple[tuple, list[ReplaySession]]:
    sessions = [
        ReplaySession({(f"/projects/{PROJECT}/aggregated/machineTypes", ""): MACHINES_PAGE1,
                       (f"/projects/{PROJECT}/aggregated/machineTypes", "m2"): MACHINES_PAGE2},
                      throttle),
        ReplaySession({(f"/projects/{PROJECT}/aggregated/acceleratorTypes", ""): ACCELERATORS}),
        ReplaySession({("/services/6F81-5844-456A/skus", ""): SKUS_PAGE1,
                       ("/services/6F81-5844-456A/skus", "s2"): SKUS_PAGE2}),
    ]  # fmt: skip
    creds = AnonymousCredentials()
    kinds = (compute_v1.MachineTypesClient, compute_v1.AcceleratorTypesClient,
             billing_v1.CloudCatalogClient)  # fmt: skip
    made = []
    for module, kind, session in zip(TRANSPORTS, kinds, sessions, strict=True):
        # The REST transport makes its HTTP session in __init__: hand it the replay one.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "AuthorizedSession", lambda *a, s=session, **k: s)
            made.append(kind(credentials=creds, transport="rest"))
    return tuple(made), sessions


GPU_MEM = {"T4": 16.0, "A100": 40.0, "L4": 24.0}


def test_rows_prices_and_pagination(caplog: pytest.LogCaptureFixture) -> None:
    made, sessions = clients()
    with caplog.at_level(logging.WARNING):
        rows, stats = fetch_gcp(PROJECT, clients=made, gpu_memory=GPU_MEM, sleep=lambda s: None)
    # every page of both paginated APIs was requested, with the previous page's token
    assert [t for _, t in sessions[0].calls] == ["", "m2"]
    assert [t for _, t in sessions[2].calls] == ["", "s2"]
    assert stats.pages == 5
    by = {(o.region, o.instance_type, o.gpu, o.gpu_count): o for o in rows}
    a2 = by[("us-central1", "a2-highgpu-1g", "A100", 1)]
    assert a2.price == pytest.approx(12 * 0.031611 + 85 * 0.004237 + 2.933908, abs=1e-4)
    assert a2.spot_price is None  # no spot A2/A100 SKU in the recording
    t4 = by[("us-central1", "n1-standard-4", "T4", 1)]
    assert t4.price == pytest.approx(4 * 0.031611 + 15 * 0.004237 + 0.35, abs=1e-4)
    assert t4.spot_price == pytest.approx(4 * 0.00698 + 15 * 0.000936 + 0.1915, abs=1e-4)
    t4x2 = by[("us-central1", "n1-standard-8", "T4", 2)]
    assert t4x2.price == pytest.approx(8 * 0.031611 + 30 * 0.004237 + 0.70, abs=1e-4)
    g2 = by[("europe-west4", "g2-standard-4", "L4", 1)]
    assert g2.price == pytest.approx(4 * 0.0275 + 16 * 0.00322 + 0.61666, abs=1e-4)
    assert g2.gpu_memory_gib == 24.0 and g2.spot_price is None  # no spot G2 host SKU
    # commitment SKU ignored: T4 price is the on-demand 0.35, not 0.22
    # europe-west4 T4 on n1: no N1 host price -> dropped with a warning, never 0
    assert "gcp/europe-west4/n1-standard-4" in stats.dropped_no_price
    assert "no price found; row dropped" in caplog.text
    assert all(o.price != 0 and o.spot_price != 0 for o in rows)
    assert not [o for o in rows if o.gpu == "L4" and o.instance_type.startswith("n1")]


def test_region_filter() -> None:
    made, _ = clients()
    rows, _ = fetch_gcp(
        PROJECT, ["europe-west4"], clients=made, gpu_memory=GPU_MEM, sleep=lambda s: None
    )
    assert {o.region for o in rows} == {"europe-west4"}


def test_throttling_retried_then_surfaced() -> None:
    made, _sessions = clients(throttle=2)
    slept: list[float] = []
    rows, stats = fetch_gcp(PROJECT, clients=made, gpu_memory=GPU_MEM, sleep=slept.append)
    assert rows and stats.retries == 2 and slept == [1.0, 2.0]
    made, _ = clients(throttle=99)
    with pytest.raises(ThrottledError, match=r"machineTypes\.aggregatedList: still throttled"):
        fetch_gcp(PROJECT, clients=made, gpu_memory=GPU_MEM, sleep=lambda s: None)


def test_gpu_sku_names() -> None:
    assert gpu_sku_kind("Nvidia Tesla T4 GPU running in Americas") == "T4"
    assert gpu_sku_kind("Nvidia Tesla A100 80GB GPU running in Americas") == "A100-80GB"
    assert gpu_sku_kind("Nvidia H100 80GB GPU running in Americas") == "H100"
    assert gpu_sku_kind("Nvidia H100 80GB Mega GPU running in Americas") == "H100-MEGA"
    assert gpu_sku_kind("Nvidia L4 GPU running in EMEA") == "L4"
    assert gpu_sku_kind("N1 Predefined Instance Core running in Americas") is None
