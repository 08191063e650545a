"""Geography: great-circle distance between regions and a network round-trip estimate.

No public inter-region RTT matrix exists to bundle, so RTT is estimated from distance:

    rtt_ms = 2 * d_km / 200 km/ms * ROUTE_FACTOR + BASE_MS

Light in fibre travels at ~200,000 km/s (refractive index ~1.5), a round trip covers the
distance twice, fibre routes are ~1.5x longer than the great circle, and switching and
last-mile add a few ms (BASE_MS). Examples: us-east-1 (Ashburn) to eu-west-1 (Dublin),
5,440 km -> ~85 ms (cloudping-style measurements show 65-80 ms); same city -> BASE_MS.
"""

from __future__ import annotations

import math

from skybroker.catalog.schema import Catalog, Region

EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG)
FIBRE_KM_PER_MS = 200.0  # ~c / 1.5
ROUTE_FACTOR = 1.5  # fibre path length / great-circle length
BASE_MS = 2.0  # switching, queueing and last mile inside a region

LatLon = tuple[float, float]


def haversine_km(a: LatLon, b: LatLon) -> float:
    """Great-circle distance in km between two (lat, lon) points in degrees."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def rtt_ms_from_km(distance_km: float) -> float:
    """Estimated network round trip in ms over `distance_km` of great-circle distance."""
    if distance_km < 0:
        raise ValueError(f"distance_km must be >= 0, got {distance_km}")
    return 2.0 * distance_km / FIBRE_KM_PER_MS * ROUTE_FACTOR + BASE_MS


def _latlon(point: Region | LatLon) -> LatLon:
    return (point.lat, point.lon) if isinstance(point, Region) else point


def distance_km(a: Region | LatLon, b: Region | LatLon) -> float:
    """Great-circle km between two regions or (lat, lon) points."""
    return haversine_km(_latlon(a), _latlon(b))


def rtt_ms(a: Region | LatLon, b: Region | LatLon) -> float:
    """Estimated RTT in ms between two regions or (lat, lon) points."""
    return rtt_ms_from_km(distance_km(a, b))


def region_rtt_ms(catalog: Catalog, a: tuple[str, str], b: tuple[str, str]) -> float:
    """Estimated RTT in ms between two (cloud, region) pairs located by `catalog.regions`.

    Raises KeyError naming the pair when the catalog has no location for it.
    """
    ra, rb = catalog.region_of(*a), catalog.region_of(*b)
    for pair, found in ((a, ra), (b, rb)):
        if found is None:
            raise KeyError(f"no location for region {pair[0]}/{pair[1]} in the catalog")
    assert ra is not None and rb is not None
    return rtt_ms(ra, rb)


def nearest_regions(
    catalog: Catalog, point: LatLon, cloud: str | None = None, limit: int = 5
) -> list[tuple[Region, float]]:
    """The `limit` regions closest to `point` (optionally of one cloud) with their RTT in ms."""
    regions = [r for r in catalog.regions.values() if cloud is None or r.cloud == cloud]
    ranked = sorted(((r, rtt_ms(point, r)) for r in regions), key=lambda x: x[1])
    return ranked[:limit]


def egress_per_gb(catalog: Catalog, src: tuple[str, str], dst: tuple[str, str]) -> float:
    """$/GB to move data from (cloud, region) `src` to `dst`, as the source cloud bills it.

    Same region: 0. Same cloud: inter-region price within a geographic area, inter-area
    price across areas (areas from regions.csv). Another cloud or the internet: the source
    cloud's internet egress price. Raises KeyError naming what the catalog lacks.
    """
    if src == dst:
        return 0.0
    egress = catalog.egress.get(src[0].lower())
    if egress is None:
        raise KeyError(f"no egress prices for cloud {src[0]!r} in the catalog")
    if src[0].lower() != dst[0].lower():
        return egress.internet_per_gb
    a, b = catalog.region_of(*src), catalog.region_of(*dst)
    for pair, found in ((src, a), (dst, b)):
        if found is None:
            raise KeyError(f"no location for region {pair[0]}/{pair[1]} in the catalog")
    assert a is not None and b is not None
    return egress.inter_region_per_gb if a.area == b.area else egress.inter_area_per_gb
