"""Load and validate catalog CSV files (plain `csv` module: the whole bundle loads in ms).

A catalog directory holds up to four files, each optional in a user directory:
offerings.csv, gpus.csv, regions.csv, egress.csv (columns in catalogs/README.md). A bad
cell raises `CatalogError` naming the file, the line and the column. Later directories
override earlier ones row by row (same key), so a user catalog can patch a few prices.
"""

from __future__ import annotations

import csv
import importlib.resources
import logging
import operator
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from skybroker.catalog.schema import GPU, Catalog, Egress, Offering, Region

logger = logging.getLogger(__name__)

# catalogs/ of the source tree, reached through the package's `_catalogs` link; a wheel ships
# the files themselves there as package data.
BUNDLED_DIR = Path(str(importlib.resources.files("skybroker") / "_catalogs")).resolve()
ENV_DIRS = "SKYBROKER_CATALOG_DIRS"  # os.pathsep-separated extra catalog directories
AREAS = ("us", "ca", "sa", "eu", "me", "africa", "asia", "oceania")
INTERCONNECTS = ("nvlink", "pcie", "infinity-fabric")

OFFERING_COLUMNS = (
    "cloud", "region", "zone", "instance_type", "gpu", "gpu_count", "gpu_memory_gib",
    "vcpus", "memory_gib", "price", "spot_price",
)  # fmt: skip
GPU_COLUMNS = (
    "name", "vendor", "memory_gib", "memory_bandwidth_gbs", "fp16_tflops", "fp8_tflops",
    "interconnect", "interconnect_gbs",
)  # fmt: skip
REGION_COLUMNS = ("cloud", "region", "city", "country", "lat", "lon", "area")
EGRESS_COLUMNS = ("cloud", "internet_per_gb", "inter_region_per_gb", "inter_area_per_gb")
# Optional per-directory provenance: which figures came from where and when.
SOURCE_COLUMNS = ("cloud", "file", "as_of", "source")


class CatalogError(ValueError):
    """A catalog file is malformed; the message names file, line and column."""


class _Row:
    """One CSV row with typed getters that raise `CatalogError` naming the cell."""

    def __init__(self, path: Path, line: int, cells: dict[str, str]) -> None:
        self.path, self.line, self.cells = path, line, cells

    def error(self, column: str, message: str) -> CatalogError:
        return CatalogError(f"{self.path}:{self.line}: column '{column}': {message}")

    def text(self, column: str, *, required: bool = True, choices: tuple[str, ...] = ()) -> str:
        value = (self.cells.get(column) or "").strip()
        if required and not value:
            raise self.error(column, "is empty (a value is required)")
        if choices and value not in choices:
            raise self.error(column, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def number(
        self, column: str, *, required: bool = True, lo: float = 0.0, hi: float = float("inf")
    ) -> float | None:
        raw = self.text(column, required=required)
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise self.error(column, f"{raw!r} is not a number") from None
        if not lo <= value <= hi:
            raise self.error(column, f"{value:g} is outside [{lo:g}, {hi:g}]")
        return value

    def real(self, column: str, **kw: Any) -> float:
        value = self.number(column, **kw)
        assert value is not None  # required=True by default
        return value

    def integer(self, column: str, *, lo: int = 1) -> int:
        raw = self.text(column)
        try:
            value = int(raw)
        except ValueError:
            raise self.error(column, f"{raw!r} is not a whole number") from None
        if value < lo:
            raise self.error(column, f"{value} is below {lo}")
        return value


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[_Row]:
    """Yield the rows of one CSV file after checking its header has `columns`."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise CatalogError(f"{path}:1: empty file (expected header {','.join(columns)})")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise CatalogError(
                f"{path}:1: header lacks column(s) {', '.join(missing)} "
                f"(expected {','.join(columns)})"
            )
        for line, cells in enumerate(reader, start=2):
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # blank line
            if cells[0].lstrip().startswith("#"):
                continue  # comment line
            if len(cells) != len(header):
                raise CatalogError(
                    f"{path}:{line}: has {len(cells)} cells, the header has {len(header)}"
                )
            yield _Row(path, line, dict(zip(header, cells, strict=True)))


def parse_offering(row: _Row) -> Offering:
    """One offerings.csv row -> Offering (prices checked: at least one, spot <= on-demand)."""
    price = row.number("price", required=False, lo=0.0, hi=10_000.0)
    spot = row.number("spot_price", required=False, lo=0.0, hi=10_000.0)
    if price is None and spot is None:
        raise row.error("price", "both price and spot_price are empty (need at least one)")
    if price == 0.0 or spot == 0.0:
        raise row.error("price" if price == 0.0 else "spot_price", "0 is not a price")
    if price is not None and spot is not None and spot > price:
        raise row.error("spot_price", f"spot {spot:g} is above on-demand {price:g}")
    return Offering(
        cloud=row.text("cloud").lower(),
        region=row.text("region"),
        instance_type=row.text("instance_type"),
        gpu=row.text("gpu"),
        gpu_count=row.integer("gpu_count"),
        gpu_memory_gib=row.real("gpu_memory_gib", lo=0.5, hi=2048.0),
        vcpus=row.real("vcpus", hi=4096.0),
        memory_gib=row.real("memory_gib", hi=65_536.0),
        price=price,
        spot_price=spot,
        zone=row.text("zone", required=False) or None,
    )


def parse_gpu(row: _Row) -> GPU:
    """One gpus.csv row -> GPU."""
    return GPU(
        name=row.text("name"),
        vendor=row.text("vendor", choices=("nvidia", "amd", "intel", "google", "aws")),
        memory_gib=row.real("memory_gib", lo=1.0, hi=4096.0),
        memory_bandwidth_gbs=row.real("memory_bandwidth_gbs", lo=1.0, hi=100_000.0),
        fp16_tflops=row.real("fp16_tflops", lo=0.1, hi=100_000.0),
        fp8_tflops=row.number("fp8_tflops", required=False, lo=0.1, hi=100_000.0),
        interconnect=row.text("interconnect", choices=INTERCONNECTS),
        interconnect_gbs=row.real("interconnect_gbs", lo=0.1, hi=100_000.0),
    )


def parse_region(row: _Row) -> Region:
    """One regions.csv row -> Region."""
    return Region(
        cloud=row.text("cloud").lower(),
        region=row.text("region"),
        city=row.text("city"),
        country=row.text("country"),
        lat=row.real("lat", lo=-90.0, hi=90.0),
        lon=row.real("lon", lo=-180.0, hi=180.0),
        area=row.text("area", choices=AREAS),
    )


def parse_egress(row: _Row) -> Egress:
    """One egress.csv row -> Egress."""
    return Egress(
        cloud=row.text("cloud").lower(),
        internet_per_gb=row.real("internet_per_gb", hi=10.0),
        inter_region_per_gb=row.real("inter_region_per_gb", hi=10.0),
        inter_area_per_gb=row.real("inter_area_per_gb", hi=10.0),
    )


def read_offerings(path: Path) -> list[Offering]:
    """offerings.csv -> Offerings. A fast path converts plain rows directly; any row it
    rejects is re-parsed by `parse_offering`, which raises the error naming the cell."""
    out: list[Offering] = []
    with path.open(newline="", encoding="utf-8") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    if not all(c in header for c in OFFERING_COLUMNS):
        list(_rows(path, OFFERING_COLUMNS))  # raises the header error
    pick = operator.itemgetter(*(header.index(c) for c in OFFERING_COLUMNS))
    width = len(header)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for line, cells in enumerate(reader, start=2):
            try:
                if len(cells) != width or cells[0].startswith("#"):
                    raise ValueError
                cl, rg, zn, it, gp, n, gm, vc, mm, pr, sp = pick(cells)
                # float() accepts surrounding blanks; an all-blank cell raises -> slow path.
                price = float(pr) if pr else None
                spot = float(sp) if sp else None
                count, gmem, vcpus, mem = int(n), float(gm), float(vc), float(mm)
                cl, rg, it, gp = cl.strip().lower(), rg.strip(), it.strip(), gp.strip()
                if not (
                    cl and rg and it and gp and count >= 1
                    and 0.5 <= gmem <= 2048.0 and 0.0 <= vcpus <= 4096.0
                    and 0.0 <= mem <= 65_536.0
                    and (price is not None or spot is not None)
                    and (price is None or 0.0 < price <= 10_000.0)
                    and (spot is None or 0.0 < spot <= 10_000.0)
                    and (price is None or spot is None or spot <= price)
                ):  # fmt: skip
                    raise ValueError
                o = Offering(
                    cl, rg, it, gp, count, gmem, vcpus, mem, price, spot, zn.strip() or None
                )
            except ValueError:
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue  # blank line
                if cells[0].lstrip().startswith("#"):
                    continue  # comment line
                if len(cells) != width:
                    raise CatalogError(
                        f"{path}:{line}: has {len(cells)} cells, the header has {width}"
                    ) from None
                o = parse_offering(_Row(path, line, dict(zip(header, cells, strict=True))))
            out.append(o)
    return out


def offering_key(o: Offering) -> tuple[str, str, str | None, str, str, int]:
    """What makes an offering row unique: (cloud, region, zone, instance_type, gpu, count).

    GPU and count are part of it because a GCP n1 host can carry different accelerators."""
    return (o.cloud, o.region, o.zone, o.instance_type, o.gpu, o.gpu_count)


def _read(path: Path, columns: tuple[str, ...], parse: Callable[[_Row], Any]) -> list[Any]:
    return [parse(row) for row in _rows(path, columns)]


def read_dir(directory: Path, catalog: Catalog) -> None:
    """Merge the catalog files found in `directory` into `catalog` (later rows win)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CatalogError(f"{directory}: catalog directory does not exist")
    files = [directory / n for n in ("offerings.csv", "gpus.csv", "regions.csv", "egress.csv")]
    if not any(p.exists() for p in files):
        raise CatalogError(
            f"{directory}: holds none of offerings.csv, gpus.csv, regions.csv, egress.csv"
        )
    offerings_path, gpus_path, regions_path, egress_path = files
    if gpus_path.exists():
        catalog.gpus.update((g.name, g) for g in _read(gpus_path, GPU_COLUMNS, parse_gpu))
    if regions_path.exists():
        regions = _read(regions_path, REGION_COLUMNS, parse_region)
        catalog.regions.update(((r.cloud, r.region), r) for r in regions)
    if egress_path.exists():
        catalog.egress.update(
            (e.cloud, e) for e in _read(egress_path, EGRESS_COLUMNS, parse_egress)
        )
    if offerings_path.exists():
        merge_offerings(catalog, read_offerings(offerings_path))
    sources_path = directory / "sources.csv"
    if sources_path.exists():
        for row in _rows(sources_path, SOURCE_COLUMNS):
            catalog.as_of[row.text("cloud").lower()] = row.text("as_of")
    catalog.sources.append(str(directory))


def merge_offerings(catalog: Catalog, new: list[Offering]) -> None:
    """Add `new` offerings; a row with the key of an existing one replaces it."""
    if not catalog.offerings:
        catalog.offerings.extend(new)
        return
    index = {offering_key(o): i for i, o in enumerate(catalog.offerings)}
    for o in new:
        i = index.get(offering_key(o))
        if i is None:
            index[offering_key(o)] = len(catalog.offerings)
            catalog.offerings.append(o)
        else:
            catalog.offerings[i] = o


def env_dirs() -> list[Path]:
    """Extra catalog directories named by $SKYBROKER_CATALOG_DIRS (os.pathsep-separated)."""
    raw = os.environ.get(ENV_DIRS, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def check_references(catalog: Catalog) -> list[str]:
    """Offerings whose GPU kind has no spec or whose region has no location, as messages."""
    problems: list[str] = []
    for gpu in sorted({o.gpu for o in catalog.offerings} - set(catalog.gpus)):
        problems.append(f"GPU kind {gpu!r} has offerings but no row in gpus.csv")
    located = set(catalog.regions)
    for cloud, region in sorted({(o.cloud, o.region) for o in catalog.offerings} - located):
        problems.append(f"region {cloud}/{region} has offerings but no row in regions.csv")
    return problems


def load_catalog(
    extra_dirs: list[Path] | None = None,
    *,
    include_bundled: bool = True,
    include_skypilot: bool = False,
) -> Catalog:
    """Load the bundled snapshot, then SkyPilot's catalog files, then user directories.

    Order of precedence (later wins, row by row): bundled `catalogs/`, SkyPilot's
    `vms.csv` files (when `include_skypilot`), $SKYBROKER_CATALOG_DIRS, `extra_dirs`.
    """
    catalog = Catalog()
    if include_bundled:
        read_dir(BUNDLED_DIR, catalog)
    if include_skypilot:
        from skybroker.catalog.skypilot import read_skypilot_catalogs

        read_skypilot_catalogs(catalog)
    for directory in [*env_dirs(), *(extra_dirs or [])]:
        read_dir(Path(directory), catalog)
    for problem in check_references(catalog):
        logger.warning("catalog: %s", problem)
    return catalog
