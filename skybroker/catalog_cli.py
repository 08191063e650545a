"""`skybroker catalog ...`: browse GPU kinds, offerings and the catalog's sources; refresh it.

Every command reads the bundled snapshot plus `--catalog DIR` directories (repeatable) and
$SKYBROKER_CATALOG_DIRS; `--skypilot` adds SkyPilot's own catalog files. Tables are rich
tables; `--json` prints JSON for scripts. Imports stay inside the commands so that
`skybroker --help` loads nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from skybroker.catalog.schema import Catalog, Offering

app = typer.Typer(
    help="GPU offerings, prices and specs of several clouds.",
    no_args_is_help=True,
)

CatalogDirs = Annotated[
    list[Path] | None,
    typer.Option(
        "--catalog",
        help="Extra catalog directory (offerings.csv, gpus.csv, ...); repeatable. "
        "$SKYBROKER_CATALOG_DIRS adds more.",
    ),
]
Skypilot = Annotated[
    bool, typer.Option("--skypilot", help="Also read SkyPilot's catalog files (~/.sky/catalogs).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# The cloud SDKs' own errors (no credentials, access denied, ...) are one line, not a traceback.
_SDK_MODULES = ("botocore", "boto3", "google", "azure", "msal")
_CREDENTIALS = {
    "aws": "AWS credentials: `aws configure`, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    "gcp": "GCP credentials: `gcloud auth application-default login`",
    "azure": "Azure credentials: `az login`, or AZURE_CLIENT_ID / AZURE_TENANT_ID / ...",
}


def _load(dirs: list[Path] | None, skypilot: bool) -> Catalog:
    from skybroker.catalog import CatalogError, load_catalog

    try:
        return load_catalog(dirs or None, include_skypilot=skypilot)
    except CatalogError as err:
        typer.secho(f"catalog error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}" if value >= 10 else f"{value:.3f}"


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def gpu_summary(catalog: Catalog) -> list[dict[str, object]]:
    """Per GPU kind: specs and the cheapest $/GPU-hour on demand and spot, per cloud."""
    by_kind: dict[str, dict[str, list[float | None]]] = {}
    for o in catalog.offerings:
        cell = by_kind.setdefault(o.gpu, {}).setdefault(o.cloud, [None, None])
        for i, price in enumerate((o.price, o.spot_price)):
            if price is not None:
                per_gpu = price / o.gpu_count
                cell[i] = per_gpu if cell[i] is None else min(cell[i], per_gpu)  # type: ignore[type-var]
    out = []
    for kind, clouds in by_kind.items():
        spec = catalog.gpus.get(kind)
        out.append(
            {
                "gpu": kind,
                "memory_gib": spec.memory_gib if spec else None,
                "memory_bandwidth_gbs": spec.memory_bandwidth_gbs if spec else None,
                "fp16_tflops": spec.fp16_tflops if spec else None,
                "fp8_tflops": spec.fp8_tflops if spec else None,
                "interconnect": spec.interconnect if spec else None,
                "cheapest_per_gpu_hour": {
                    c: {"on_demand": p[0], "spot": p[1]} for c, p in sorted(clouds.items())
                },
            }
        )
    out.sort(key=lambda r: (r["memory_gib"] or 0, r["memory_bandwidth_gbs"] or 0, r["gpu"]))
    return out


@app.command()
def gpus(
    catalog_dirs: CatalogDirs = None,
    skypilot: Skypilot = False,
    as_json: AsJson = False,
) -> None:
    """Each GPU kind: memory, bandwidth, FLOP/s, cheapest $/GPU-hour per cloud (on-demand / spot)."""
    catalog = _load(catalog_dirs, skypilot)
    rows = gpu_summary(catalog)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="GPU kinds: cheapest $ per GPU-hour in each cloud",
        caption="GiB, GB/s and dense fp16/fp8 TFLOP/s per GPU; '-' = not sold on that market; "
        "spot prices are point-in-time",
    )
    for col in ("GPU", "GiB", "GB/s", "fp16", "fp8", "cloud", "on-demand", "spot"):
        table.add_column(col, justify="left" if col in ("GPU", "cloud") else "right")
    for r in rows:
        cheap = r["cheapest_per_gpu_hour"]
        assert isinstance(cheap, dict)
        specs = [
            str(r["gpu"]), _num(r["memory_gib"]), _num(r["memory_bandwidth_gbs"]),  # type: ignore[arg-type]
            _num(r["fp16_tflops"]), _num(r["fp8_tflops"]),  # type: ignore[arg-type]
        ]  # fmt: skip
        for i, (cloud, p) in enumerate(cheap.items()):
            last = i == len(cheap) - 1
            table.add_row(
                *(specs if i == 0 else [""] * len(specs)), cloud,
                _money(p["on_demand"]), _money(p["spot"]), end_section=last,
            )  # fmt: skip
    Console().print(table)


def _offering_dict(o: Offering, spot: bool | None) -> dict[str, object]:
    from skybroker.catalog.schema import market_price

    d = asdict(o)
    price = market_price(o, spot)
    d["price_per_gpu_hour"] = None if price is None else round(price / o.gpu_count, 5)
    return d


@app.command()
def offerings(
    gpu: Annotated[
        str | None, typer.Option(help="GPU kind(s), comma-separated, e.g. H100,A100-80GB.")
    ] = None,
    cloud: Annotated[str | None, typer.Option(help="Cloud(s), comma-separated.")] = None,
    region: Annotated[str | None, typer.Option(help="Region(s), comma-separated.")] = None,
    spot: Annotated[
        bool | None, typer.Option("--spot/--on-demand", help="Market (default: either).")
    ] = None,
    max_price: Annotated[
        float | None, typer.Option(help="Max $/h for the whole instance on that market.", min=0)
    ] = None,
    min_gpu_memory: Annotated[
        float | None, typer.Option(help="Min GPU memory of the whole instance, GiB.", min=0)
    ] = None,
    min_gpus: Annotated[int | None, typer.Option(help="Min GPUs per instance.", min=1)] = None,
    limit: Annotated[
        int, typer.Option(help="Show at most this many rows (as the API's limit).", min=1)
    ] = 40,
    catalog_dirs: CatalogDirs = None,
    skypilot: Skypilot = False,
    as_json: AsJson = False,
) -> None:
    """Offerings matching the filters, cheapest first."""
    catalog = _load(catalog_dirs, skypilot)
    try:
        catalog.check_names(gpu=gpu, cloud=cloud)
    except ValueError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    rows = catalog.query(
        gpu=gpu, cloud=cloud, region=region, spot=spot, max_price=max_price,
        min_gpu_memory_gib=min_gpu_memory, min_gpu_count=min_gpus,
    )  # fmt: skip
    total = len(rows)
    rows = rows[:limit]
    if as_json:
        typer.echo(json.dumps([_offering_dict(o, spot) for o in rows], indent=2))
        return
    if not rows:
        typer.echo("No offering matches these filters.", err=True)
        raise typer.Exit(1)
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{total} offerings" + (f" (first {len(rows)})" if total > len(rows) else "")
    )
    from skybroker.catalog.schema import market_price

    for col in ("cloud", "region", "instance type", "GPUs"):
        table.add_column(col, no_wrap=col in ("instance type", "GPUs"))
    for col in ("vCPU", "RAM", "$/h", "spot $/h", "$/GPU-h"):
        table.add_column(col, justify="right")
    for o in rows:
        market = market_price(o, spot)
        table.add_row(
            o.cloud, o.region + (f"/{o.zone}" if o.zone else ""), o.instance_type,
            f"{o.gpu_count}x {o.gpu} {o.gpu_memory_gib:g}G", _num(o.vcpus), _num(o.memory_gib),
            _money(o.price), _money(o.spot_price), _money((market or 0) / o.gpu_count),
        )  # fmt: skip
    Console().print(table)


def staleness_days(as_of: str, today: date | None = None) -> int | None:
    """Days since an as-of date written YYYY, YYYY-MM or YYYY-MM-DD (start of the period)."""
    parts = as_of.strip().split("-")
    try:
        nums = [int(p) for p in parts[:3]] + [1] * (3 - min(3, len(parts)))
        return ((today or date.today()) - date(nums[0], nums[1], nums[2])).days
    except (ValueError, IndexError):
        return None


def catalog_info(catalog: Catalog) -> dict[str, object]:
    """Sources, dates, row counts per cloud and staleness."""
    per_cloud: dict[str, dict[str, object]] = {}
    for o in catalog.offerings:
        c = per_cloud.setdefault(
            o.cloud, {"offerings": 0, "regions": set(), "gpus": set(), "spot_rows": 0}
        )
        c["offerings"] += 1  # type: ignore[operator]
        c["regions"].add(o.region)  # type: ignore[union-attr]
        c["gpus"].add(o.gpu)  # type: ignore[union-attr]
        c["spot_rows"] += o.spot_price is not None  # type: ignore[operator]
    clouds = {}
    for cloud, c in sorted(per_cloud.items()):
        as_of = catalog.as_of.get(cloud)
        clouds[cloud] = {
            "offerings": c["offerings"],
            "with_spot_price": c["spot_rows"],
            "regions": len(c["regions"]),  # type: ignore[arg-type]
            "gpu_kinds": sorted(c["gpus"]),  # type: ignore[type-var]
            "as_of": as_of,
            "age_days": staleness_days(as_of) if as_of else None,
        }
    return {
        "sources": catalog.sources,
        "offerings": len(catalog.offerings),
        "gpu_kinds": len({o.gpu for o in catalog.offerings}),
        "gpu_specs": len(catalog.gpus),
        "regions": len(catalog.regions),
        "egress_clouds": sorted(catalog.egress),
        "clouds": clouds,
    }


@app.command()
def info(
    catalog_dirs: CatalogDirs = None,
    skypilot: Skypilot = False,
    as_json: AsJson = False,
) -> None:
    """Where the figures came from, when, row counts per cloud and how stale they are."""
    data = catalog_info(_load(catalog_dirs, skypilot))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("Sources: " + ", ".join(str(s) for s in data["sources"]))  # type: ignore[union-attr]
    console.print(
        f"{data['offerings']} offerings, {data['gpu_kinds']} GPU kinds, "
        f"{data['regions']} located regions, egress for {', '.join(data['egress_clouds'])}"  # type: ignore[arg-type]
    )
    table = Table(title="Per cloud")
    for col in ("cloud", "offerings", "with spot", "regions", "GPU kinds", "as of", "age"):
        table.add_column(col)
    clouds = data["clouds"]
    assert isinstance(clouds, dict)
    for cloud, c in clouds.items():
        age = c["age_days"]
        age_txt = "-" if age is None else f"{age} d" + (" (stale)" if age > 90 else "")
        table.add_row(
            cloud, str(c["offerings"]), str(c["with_spot_price"]), str(c["regions"]),
            ", ".join(c["gpu_kinds"]), c["as_of"] or "-", age_txt,
        )  # fmt: skip
    console.print(table)


@app.command()
def refresh(
    cloud: Annotated[str, typer.Option(help="Cloud to refresh: aws, gcp or azure.")],
    out: Annotated[
        Path, typer.Option(help="Directory to write offerings.csv and sources.csv into.")
    ] = Path("~/.skybroker/catalog"),
    region: Annotated[
        list[str] | None,
        typer.Option(help="Region to read (repeatable; default: a set of big ones)."),
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(help="GCP project ($GOOGLE_CLOUD_PROJECT).", envvar="GOOGLE_CLOUD_PROJECT"),
    ] = None,
    subscription: Annotated[
        str | None,
        typer.Option(
            help="Azure subscription id ($AZURE_SUBSCRIPTION_ID).", envvar="AZURE_SUBSCRIPTION_ID"
        ),
    ] = None,
) -> None:
    """Fetch GPU offerings and prices from a cloud's own APIs into a catalog directory.

    Use the result with `--catalog DIR` or by adding DIR to $SKYBROKER_CATALOG_DIRS.
    """
    from skybroker.catalog.refresh import CLOUDS, RefreshError, write_catalog

    cloud = cloud.lower()
    if cloud not in CLOUDS:
        raise typer.BadParameter(
            f"{cloud!r} is not one of {', '.join(CLOUDS)}", param_hint="--cloud"
        )
    regions = list(region or [])
    try:
        if cloud == "aws":
            from skybroker.catalog.refresh.aws import DEFAULT_REGIONS, fetch_aws

            rows, stats = fetch_aws(regions or DEFAULT_REGIONS)
            source = "AWS EC2 DescribeInstanceTypes/DescribeSpotPriceHistory + Pricing GetProducts"
        elif cloud == "gcp":
            if not project:
                raise typer.BadParameter("a GCP project is required", param_hint="--project")
            from skybroker.catalog.refresh.gcp import fetch_gcp

            rows, stats = fetch_gcp(project, regions or None)
            source = f"GCP compute machineTypes/acceleratorTypes (project {project}) + Cloud Billing SKUs"
        else:
            if not subscription:
                raise typer.BadParameter(
                    "an Azure subscription id is required", param_hint="--subscription"
                )
            from skybroker.catalog.refresh.azure import DEFAULT_REGIONS as AZ_REGIONS
            from skybroker.catalog.refresh.azure import fetch_azure

            rows, stats = fetch_azure(subscription, regions or AZ_REGIONS)
            source = "Azure resource SKUs (azure-mgmt-compute) + Azure Retail Prices API"
    except ImportError as err:
        typer.secho(
            f"{cloud} refresh needs the cloud SDKs: pip install 'skybroker[cloud]' ({err})",
            fg=typer.colors.RED, err=True,
        )  # fmt: skip
        raise typer.Exit(1) from None
    except RefreshError as err:
        typer.secho(f"{cloud} refresh failed: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except Exception as err:
        if not type(err).__module__.startswith(_SDK_MODULES):
            raise
        typer.secho(f"{cloud} refresh failed: {type(err).__name__}: {err} ({_CREDENTIALS[cloud]})",
                    fg=typer.colors.RED, err=True)  # fmt: skip
        raise typer.Exit(1) from None
    if not rows:
        typer.secho(f"{cloud}: no GPU offering with a price was found; nothing written", err=True)
        raise typer.Exit(1)
    path = write_catalog(out.expanduser(), cloud, rows, source)
    typer.echo(
        f"{cloud}: wrote {len(rows)} offerings to {path} ({stats.pages} API pages, "
        f"{stats.retries} throttling retries; dropped {len(stats.dropped_no_price)} without a price, "
        f"{len(stats.dropped_spot_above_on_demand)} spot prices above on-demand)"
    )
    typer.echo(f"use it with: --catalog {out}  (or add it to $SKYBROKER_CATALOG_DIRS)")
