"""AWS refresher offline: moto serves EC2 (instance types, spot history); moto has no Pricing
backend, so get_products is answered through botocore's Stubber with recorded-style pages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.stub import ANY, Stubber
from moto import mock_aws

from skybroker.catalog import load_catalog
from skybroker.catalog.refresh import ThrottledError, write_catalog
from skybroker.catalog.refresh.aws import fetch_aws, is_throttle, on_demand_prices
from skybroker.catalog.refresh.common import FetchStats, gpu_kind, with_retries

REGION = "us-east-1"
CONFIG = Config(retries={"max_attempts": 1, "mode": "standard"})


def product(itype: str, usd: str) -> str:
    """One PriceList entry as the Pricing API returns it (a JSON string)."""
    return json.dumps({
        "product": {"productFamily": "Compute Instance",
                    "attributes": {"instanceType": itype, "regionCode": REGION,
                                   "operatingSystem": "Linux"}},
        "terms": {"OnDemand": {"X.JRTCKXETXF": {"priceDimensions": {
            "X.JRTCKXETXF.6YS6EN2CT7": {"unit": "Hrs", "pricePerUnit": {"USD": usd}}}}}},
    })  # fmt: skip


PAGES = [
    {"PriceList": [product("g5.xlarge", "1.0060000000"), product("m5.large", "0.096")],
     "FormatVersion": "aws_v1", "NextToken": "page1"},
    {"PriceList": [product("p4d.24xlarge", "32.7726000000"), product("g6.xlarge", "0.0")],
     "FormatVersion": "aws_v1"},
]  # fmt: skip


def stubbed_pricing(pages: list[dict], errors: tuple[str, ...] = ()) -> tuple[object, Stubber]:
    pricing = boto3.client(
        "pricing", region_name=REGION, config=CONFIG,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    stub = Stubber(pricing)
    for code in errors:
        stub.add_client_error("get_products", service_error_code=code, http_status_code=400)
    for i, page in enumerate(pages):
        expected = {"ServiceCode": "AmazonEC2", "Filters": ANY, "FormatVersion": "aws_v1"}
        if i:
            expected["NextToken"] = f"page{i}"
        stub.add_response("get_products", page, expected)
    stub.activate()
    return pricing, stub


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory):
    """One moto-backed fetch shared by the tests below (moto's EC2 is slow to start)."""
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": REGION}.items():  # fmt: skip
        mp.setenv(k, v)
    handler = _Collect()
    logging.getLogger("skybroker.catalog.refresh").addHandler(handler)
    try:
        with mock_aws():
            pricing, stub = stubbed_pricing(PAGES)

            def ec2(region: str):
                return boto3.client("ec2", region_name=region, config=CONFIG)

            rows, stats = fetch_aws([REGION], clients=(ec2, pricing), sleep=lambda s: None)
            stub.assert_no_pending_responses()  # both Pricing pages were read
    finally:
        logging.getLogger("skybroker.catalog.refresh").removeHandler(handler)
        mp.undo()
    return rows, stats, handler.messages


def test_rows_prices_and_pagination(fetched) -> None:
    rows, stats, _ = fetched
    by = {o.instance_type: o for o in rows}
    g5 = by["g5.xlarge"]
    assert (g5.gpu, g5.gpu_count, g5.vcpus, g5.memory_gib) == ("A10G", 1, 4.0, 16.0)
    assert g5.gpu_memory_gib == pytest.approx(22.35) and g5.price == pytest.approx(1.006)
    assert g5.spot_price is not None and g5.spot_price <= g5.price  # moto's spot history
    p4d = by["p4d.24xlarge"]
    assert (p4d.gpu, p4d.gpu_count, p4d.price) == ("A100", 8, 32.7726)
    assert "m5.large" not in by  # CPU-only types are not GPU offerings
    assert stats.pages >= 4 and stats.kept == len(rows)
    assert {o.gpu for o in rows} >= {"A10G", "A100", "H100", "L4", "T4"}


def test_no_price_is_never_zero(fetched) -> None:
    rows, stats, messages = fetched
    by = {o.instance_type: o for o in rows}
    # g6.xlarge lists 0.0 on demand: that is no price (its spot price keeps the row).
    assert by["g6.xlarge"].price is None and by["g6.xlarge"].spot_price is not None
    assert all(o.price != 0 and o.spot_price != 0 for o in rows)
    # Types priced on neither market are dropped, each with a warning.
    assert stats.dropped_no_price and not set(stats.dropped_no_price) & {
        f"aws/{REGION}/{o.instance_type}" for o in rows
    }
    assert sum("no price found; row dropped" in m for m in messages) == len(stats.dropped_no_price)


def test_written_catalog_loads(fetched, tmp_path: Path) -> None:
    rows, _, _ = fetched
    write_catalog(tmp_path, "aws", rows, "test")
    cat = load_catalog([tmp_path])
    fresh = [o for o in cat.offerings
             if o.cloud == "aws" and o.region == REGION and o.instance_type == "g5.xlarge"]  # fmt: skip
    assert len(fresh) == 1 and fresh[0].price == pytest.approx(1.006)
    assert cat.as_of["aws"] != "2025-11"  # today's date from sources.csv


def test_throttling_is_retried() -> None:
    pricing, stub = stubbed_pricing(PAGES, errors=("ThrottlingException", "Throttling"))
    slept: list[float] = []
    stats = FetchStats()
    prices = on_demand_prices(pricing, REGION, stats, slept.append)
    assert prices == {"g5.xlarge": 1.006, "m5.large": 0.096, "p4d.24xlarge": 32.7726}
    assert stats.retries == 2 and slept == [1.0, 2.0] and stats.pages == 2
    stub.assert_no_pending_responses()


def test_persistent_throttling_surfaces() -> None:
    pricing, _ = stubbed_pricing([], errors=("RequestLimitExceeded",) * 5)
    with pytest.raises(ThrottledError, match="get_products: still throttled after 5 tries"):
        on_demand_prices(pricing, REGION, FetchStats(), lambda s: None)


def test_other_errors_are_not_retried() -> None:
    pricing, _ = stubbed_pricing([], errors=("AccessDeniedException",))
    stats = FetchStats()
    with pytest.raises(Exception, match="AccessDenied"):
        on_demand_prices(pricing, REGION, stats, lambda s: None)
    assert stats.retries == 0
    calls = []

    def boom():
        calls.append(1)
        raise ValueError("bad request")

    with pytest.raises(ValueError):
        with_retries(boom, is_throttle, FetchStats(), sleep=lambda s: None)
    assert calls == [1]


def test_gpu_kind_names() -> None:
    assert gpu_kind("NVIDIA Tesla T4") == "T4"
    assert gpu_kind("A100", 80) == "A100-80GB" and gpu_kind("A100", 40) == "A100"
    assert gpu_kind("V100", 32) == "V100-32GB"
    assert gpu_kind("NVIDIA H100 Tensor Core GPU") == "H100"
