"""Azure refresher offline: recorded ARM JSON replayed through azure-mgmt-compute's own
transport (azure-core RequestsTransport over a requests session whose adapter replays), and
recorded Retail Prices pages through httpx.MockTransport."""

from __future__ import annotations

import io
import json
import logging
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import HTTPAdapter
from urllib3.response import HTTPResponse

from skybroker.catalog.refresh import ThrottledError
from skybroker.catalog.refresh.azure import fetch_azure, gpu_kind_of_size, make_compute_client

SUB = "00000000-0000-0000-0000-000000000000"
REGION = "eastus"


def vm_sku(name: str, vcpus: int, mem: float, gpus: int | None, restricted: bool = False) -> dict:
    caps = [{"name": "vCPUs", "value": str(vcpus)}, {"name": "MemoryGB", "value": str(mem)}]
    if gpus is not None:
        caps.append({"name": "GPUs", "value": str(gpus)})
    return {
        "resourceType": "virtualMachines", "name": name, "tier": "Standard",
        "size": name.removeprefix("Standard_"), "locations": [REGION],
        "capabilities": caps,
        "restrictions": [{"type": "Location", "values": [REGION], "reasonCode": "NotAvailableForSubscription",
                          "restrictionInfo": {"locations": [REGION]}}] if restricted else [],
    }  # fmt: skip


SKU_PAGES = {
    "": {
        "value": [
            vm_sku("Standard_D4s_v5", 4, 16, None),
            vm_sku("Standard_NC4as_T4_v3", 4, 28, 1),
            vm_sku("Standard_NC24ads_A100_v4", 24, 220, 1),
            vm_sku("Standard_NV6ads_A10_v5", 6, 55, 1),  # a sixth of an A10: not an offering
            {"resourceType": "disks", "name": "Premium_LRS", "locations": [REGION]},
        ],
        "nextLink": f"https://management.azure.com/subscriptions/{SUB}/providers/Microsoft.Compute/skus?api-version=2021-07-01&$skiptoken=p2",
    },
    "p2": {
        "value": [
            vm_sku("Standard_ND96isr_H100_v5", 96, 1900, 8),
            vm_sku("Standard_NC6s_v3", 6, 112, 1, restricted=True),
            vm_sku("Standard_ND96asr_v4", 96, 900, 8),  # no price in the recording
        ],
    },
}  # fmt: skip


def _response(
    adapter: HTTPAdapter, request: requests.PreparedRequest, status: int, body: dict
) -> requests.Response:
    raw = HTTPResponse(
        body=io.BytesIO(json.dumps(body).encode()), status=status,
        headers={"Content-Type": "application/json"}, preload_content=False,
    )  # fmt: skip
    return adapter.build_response(request, raw)


class ArmReplay(HTTPAdapter):
    """requests adapter serving the recorded ARM resource-SKU pages by $skiptoken."""

    def __init__(self, throttle: int = 0) -> None:
        super().__init__()
        self.throttle, self.calls = throttle, []

    def send(self, request, **kwargs):  # type: ignore[override]
        query = parse_qs(urlparse(request.url).query)
        token = query.get("$skiptoken", [""])[0]
        self.calls.append((query.get("$filter", [""])[0], token))
        if self.throttle:
            self.throttle -= 1
            return _response(
                self, request, 429, {"error": {"code": "TooManyRequests", "message": "slow down"}}
            )
        return _response(self, request, 200, SKU_PAGES[token])


class FakeCredential:
    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken("token", int(time.time()) + 3600)


def compute_client(adapter: ArmReplay):
    session = requests.Session()
    session.mount("https://", adapter)
    return make_compute_client(
        SUB, FakeCredential(), transport=RequestsTransport(session=session, session_owner=False)
    )


def retail_item(sku: str, price: float, spot: bool = False, windows: bool = False) -> dict:
    name = sku.removeprefix("Standard_").replace("_", " ") + (" Spot" if spot else "")
    return {
        "currencyCode": "USD", "retailPrice": price, "unitPrice": price, "armRegionName": REGION,
        "skuName": name, "meterName": name, "armSkuName": sku, "type": "Consumption",
        "productName": "Virtual Machines NC Series" + (" Windows" if windows else ""),
        "serviceName": "Virtual Machines", "unitOfMeasure": "1 Hour",
    }  # fmt: skip


RETAIL_PAGES = [
    {"Items": [retail_item("Standard_NC4as_T4_v3", 0.526),
               retail_item("Standard_NC4as_T4_v3", 0.062699, spot=True),
               retail_item("Standard_NC4as_T4_v3", 0.71, windows=True)],
     "NextPageLink": "https://prices.azure.com/api/retail/prices?$skip=3"},
    {"Items": [retail_item("Standard_NC24ads_A100_v4", 3.673),
               retail_item("Standard_NC24ads_A100_v4", 4.0, spot=True),  # above on-demand
               retail_item("Standard_ND96isr_H100_v5", 98.32)],
     "NextPageLink": None},
]  # fmt: skip


def retail_transport(throttle: int = 0) -> tuple[httpx.MockTransport, list[str]]:
    seen: list[str] = []
    left = [throttle]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if left[0]:
            left[0] -= 1
            return httpx.Response(429, headers={"Retry-After": "1"})
        page = 1 if "$skip=3" in str(request.url) else 0
        if page == 0:
            assert "armRegionName eq 'eastus'" in request.url.params["$filter"]
        return httpx.Response(200, json=RETAIL_PAGES[page])

    return httpx.MockTransport(handler), seen


GPU_MEM = {"T4": 16.0, "A100-80GB": 80.0, "A100": 40.0, "H100": 80.0}


def test_rows_prices_pagination_and_drops(caplog: pytest.LogCaptureFixture) -> None:
    arm = ArmReplay()
    transport, seen = retail_transport()
    with httpx.Client(transport=transport) as http, caplog.at_level(logging.WARNING):
        rows, stats = fetch_azure(SUB, [REGION], compute_client=compute_client(arm), http=http,
                                  gpu_memory=GPU_MEM, sleep=lambda s: None)  # fmt: skip
    assert [t for _, t in arm.calls] == ["", "p2"]  # followed nextLink
    assert arm.calls[0][0] == "location eq 'eastus'"
    assert len(seen) == 2 and "$skip=3" in seen[1]  # followed NextPageLink
    by = {o.instance_type: o for o in rows}
    t4 = by["Standard_NC4as_T4_v3"]
    assert (t4.gpu, t4.gpu_count, t4.vcpus, t4.memory_gib) == ("T4", 1, 4.0, 28.0)
    assert (t4.price, t4.spot_price) == (0.526, 0.062699)  # Windows meter ignored
    a100 = by["Standard_NC24ads_A100_v4"]
    assert a100.gpu == "A100-80GB" and a100.price == 3.673 and a100.spot_price is None
    assert "azure/eastus/Standard_NC24ads_A100_v4" in stats.dropped_spot_above_on_demand
    h100 = by["Standard_ND96isr_H100_v5"]
    assert (h100.gpu, h100.gpu_count, h100.price) == ("H100", 8, 98.32)
    assert "Standard_NC6s_v3" not in by  # restricted for this subscription here
    assert "Standard_NV6ads_A10_v5" not in by and "Standard_D4s_v5" not in by
    assert "azure/eastus/Standard_ND96asr_v4" in stats.dropped_no_price
    assert "no price found; row dropped" in caplog.text
    assert all(o.price != 0 and o.spot_price != 0 for o in rows)


def test_throttling_retried_on_both_apis() -> None:
    arm = ArmReplay(throttle=1)
    transport, _ = retail_transport(throttle=2)
    slept: list[float] = []
    with httpx.Client(transport=transport) as http:
        rows, stats = fetch_azure(SUB, [REGION], compute_client=compute_client(arm), http=http,
                                  gpu_memory=GPU_MEM, sleep=slept.append)  # fmt: skip
    assert rows and stats.retries == 3 and slept == [1.0, 1.0, 2.0]


def test_persistent_throttling_surfaces() -> None:
    transport, _ = retail_transport(throttle=99)
    with (
        httpx.Client(transport=transport) as http,
        pytest.raises(ThrottledError, match="retail prices"),
    ):
        fetch_azure(SUB, [REGION], compute_client=compute_client(ArmReplay()), http=http,
                    gpu_memory=GPU_MEM, sleep=lambda s: None)  # fmt: skip


def test_size_names() -> None:
    assert gpu_kind_of_size("Standard_NC4as_T4_v3") == "T4"
    assert gpu_kind_of_size("Standard_NC24ads_A100_v4") == "A100-80GB"
    assert gpu_kind_of_size("Standard_ND96amsr_A100_v4") == "A100-80GB"
    assert gpu_kind_of_size("Standard_ND96asr_v4") == "A100"
    assert gpu_kind_of_size("Standard_NV36ads_A10_v5", 36) == "A10"
    assert gpu_kind_of_size("Standard_NV12ads_A10_v5", 12) is None
    assert gpu_kind_of_size("Standard_NC24s_v3") == "V100"
    assert gpu_kind_of_size("Standard_ND40rs_v2") == "V100-32GB"
    assert gpu_kind_of_size("Standard_D4s_v5") is None
