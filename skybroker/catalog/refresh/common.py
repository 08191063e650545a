"""What the refreshers share: retries on throttling, price sanity, writing a catalog dir."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TypeVar

from skybroker.catalog.loader import OFFERING_COLUMNS, SOURCE_COLUMNS
from skybroker.catalog.schema import Offering

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RefreshError(RuntimeError):
    """A refresh could not complete (bad credentials, API error, throttled too long)."""


class ThrottledError(RefreshError):
    """The API kept throttling after every retry."""


@dataclass
class FetchStats:
    """What one refresh saw: API pages read, retries, rows kept and dropped."""

    pages: int = 0
    retries: int = 0
    kept: int = 0
    dropped_no_price: list[str] = field(default_factory=list)
    dropped_spot_above_on_demand: list[str] = field(default_factory=list)


def with_retries(
    call: Callable[[], T],
    is_throttle: Callable[[Exception], bool],
    stats: FetchStats,
    *,
    attempts: int = 5,
    base_delay_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    what: str = "API call",
) -> T:
    """Run `call`, retrying with exponential backoff while `is_throttle(error)` holds.

    Raises ThrottledError after `attempts` throttled tries; other errors propagate at once.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if not is_throttle(err):
                raise
            if attempt == attempts - 1:
                raise ThrottledError(
                    f"{what}: still throttled after {attempts} tries ({err})"
                ) from err
            stats.retries += 1
            delay = base_delay_s * 2**attempt
            logger.warning("%s throttled (%s); retrying in %.1f s", what, err, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def finish(offering: Offering, stats: FetchStats) -> Offering | None:
    """Apply the price rules: spot above on-demand is dropped, a row with no price is
    dropped (logged, never written as 0). Returns the row to keep, or None."""
    key = f"{offering.cloud}/{offering.region}/{offering.instance_type}"
    price = offering.price if offering.price and offering.price > 0 else None
    spot = offering.spot_price if offering.spot_price and offering.spot_price > 0 else None
    if price is not None and spot is not None and spot > price:
        stats.dropped_spot_above_on_demand.append(key)
        logger.warning("%s: spot %.4f above on-demand %.4f; spot dropped", key, spot, price)
        spot = None
    if price is None and spot is None:
        stats.dropped_no_price.append(key)
        logger.warning("%s: no price found; row dropped", key)
        return None
    stats.kept += 1
    if (price, spot) == (offering.price, offering.spot_price):
        return offering
    from dataclasses import replace

    return replace(offering, price=price, spot_price=spot)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


def write_catalog(out_dir: Path, cloud: str, offerings: list[Offering], source: str) -> Path:
    """Write `offerings` as out_dir/offerings.csv (+ sources.csv); returns the csv path.

    An existing offerings.csv in out_dir keeps its rows of other clouds, so one directory
    can collect refreshes of several clouds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "offerings.csv"
    kept: list[list[str]] = []
    if path.exists():
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [[r[c] for c in OFFERING_COLUMNS] for r in rows if r.get("cloud") != cloud]
    ordered = sorted(offerings, key=lambda o: (o.gpu, o.gpu_count, o.instance_type, o.region))
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(OFFERING_COLUMNS)
        w.writerows(kept)
        for o in ordered:
            w.writerow(
                [_cell(v) for v in (o.cloud, o.region, o.zone, o.instance_type, o.gpu,
                 o.gpu_count, o.gpu_memory_gib, o.vcpus, o.memory_gib, o.price, o.spot_price)]
            )  # fmt: skip
    _write_source(out_dir / "sources.csv", cloud, source)
    return path


def _write_source(path: Path, cloud: str, source: str) -> None:
    rows: list[list[str]] = []
    if path.exists():
        with path.open(newline="") as f:
            rows = [
                [r[c] for c in SOURCE_COLUMNS] for r in csv.DictReader(f) if r["cloud"] != cloud
            ]
    rows.append([cloud, "offerings.csv", date.today().isoformat(), source])
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(SOURCE_COLUMNS)
        w.writerows(rows)


def gpu_kind(name: str, per_gpu_gib: float | None = None) -> str:
    """A vendor GPU name ("NVIDIA Tesla T4", "A100", "H100 80GB") -> our GPU kind.

    40 and 80 GB A100s, 16 and 32 GB V100s are different kinds (SkyPilot's names)."""
    n = name.upper().replace("NVIDIA", "").replace("TESLA", "").replace("TENSOR CORE", "")
    n = n.replace("GPU", "").strip().split()[0] if n.strip() else ""
    if n == "A100" and (per_gpu_gib or 0) > 60:
        return "A100-80GB"
    if n == "V100" and (per_gpu_gib or 0) > 20:
        return "V100-32GB"
    return n
