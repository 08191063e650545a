"""The catalog's record types: the contract between the catalog, the planner and the CLI.

One row of each bundled CSV file (see catalogs/README.md) becomes one of these frozen
dataclasses. Prices are US dollars per hour for the whole instance (all its GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GPU:
    """A GPU kind and its public spec-sheet figures (per GPU)."""

    name: str  # canonical kind, SkyPilot's spelling: "H100", "A100-80GB", "L4", "A10G" ...
    memory_gib: float
    memory_bandwidth_gbs: float  # GB/s of HBM/GDDR bandwidth
    fp16_tflops: float  # dense fp16/bf16 tensor-core TFLOP/s (no sparsity)
    fp8_tflops: float | None  # dense fp8 TFLOP/s where the GPU has fp8, else None
    interconnect: str  # "nvlink" or "pcie"
    interconnect_gbs: float  # GB/s GPU-to-GPU inside one instance
    vendor: str = "nvidia"


@dataclass(frozen=True, slots=True)
class Offering:
    """One rentable instance type in one region (or zone) of one cloud."""

    cloud: str  # "aws", "gcp", "azure", "lambda", "runpod", ...
    region: str
    instance_type: str
    gpu: str  # GPU.name
    gpu_count: int
    gpu_memory_gib: float  # per GPU
    vcpus: float
    memory_gib: float  # host RAM
    price: float | None  # on-demand $/h; None where not sold on demand
    spot_price: float | None  # spot $/h; None where not sold as spot
    zone: str | None = None

    def hourly(self, spot: bool) -> float | None:
        """The $/h of this offering on the given market, or None if not sold there."""
        return self.spot_price if spot else self.price


@dataclass(frozen=True, slots=True)
class Region:
    """Where a cloud region is, for RTT estimates from great-circle distance."""

    cloud: str
    region: str
    city: str
    country: str
    lat: float
    lon: float
    area: str  # "us", "eu", "asia", "oceania", "sa", "me", "africa"


@dataclass(frozen=True, slots=True)
class Egress:
    """Data transfer prices of one cloud, $/GB."""

    cloud: str
    internet_per_gb: float
    inter_region_per_gb: float
    inter_area_per_gb: float  # between geographic areas (e.g. us <-> eu), where it differs


@dataclass(slots=True)
class Catalog:
    """Everything the planner reads: offerings, GPU specs, region locations and egress."""

    offerings: list[Offering] = field(default_factory=list)
    gpus: dict[str, GPU] = field(default_factory=dict)
    regions: dict[tuple[str, str], Region] = field(default_factory=dict)  # (cloud, region)
    egress: dict[str, Egress] = field(default_factory=dict)  # by cloud
    sources: list[str] = field(default_factory=list)  # files or APIs the figures came from
    as_of: dict[str, str] = field(default_factory=dict)  # cloud -> date its prices were read

    def query(
        self,
        gpu: str | None = None,
        cloud: str | None = None,
        region: str | None = None,
        spot: bool | None = None,
        max_price: float | None = None,
        min_gpu_memory_gib: float | None = None,
        min_gpu_count: int | None = None,
    ) -> list[Offering]:
        """Offerings matching every filter given, cheapest first.

        `gpu`, `cloud` and `region` compare case-insensitively and may list several values
        separated by commas. `spot=True` keeps offerings sold as spot, `False` those sold on
        demand, `None` either; `max_price` applies to that market's $/h (either market when
        `spot` is None). `min_gpu_memory_gib` is the memory of the whole instance (all GPUs).
        """
        gpus, clouds, regions = _choices(gpu), _choices(cloud), _choices(region)
        out: list[Offering] = []
        for o in self.offerings:
            if gpus and o.gpu.lower() not in gpus:
                continue
            if clouds and o.cloud.lower() not in clouds:
                continue
            if regions and o.region.lower() not in regions:
                continue
            if (
                min_gpu_memory_gib is not None
                and o.gpu_memory_gib * o.gpu_count < min_gpu_memory_gib
            ):
                continue
            if min_gpu_count is not None and o.gpu_count < min_gpu_count:
                continue
            price = market_price(o, spot)
            if price is None or (max_price is not None and price > max_price):
                continue
            out.append(o)
        out.sort(key=lambda o: (market_price(o, spot) or 0.0, o.cloud, o.region, o.instance_type))
        return out

    def check_names(self, gpu: str | None = None, cloud: str | None = None) -> None:
        """ValueError naming a GPU kind or cloud (comma-separated lists, as `query` takes)
        that this catalog has no offering of, and the ones it has."""
        for what, value, have in (
            ("GPU kind", gpu, {o.gpu for o in self.offerings}),
            ("cloud", cloud, {o.cloud for o in self.offerings}),
        ):
            low = {h.lower() for h in have}
            bad = [v.strip() for v in (value or "").split(",") if v.strip().lower() not in low]
            bad = [v for v in bad if v]
            if bad:
                raise ValueError(f"unknown {what} {bad[0]!r}; the catalog has: "
                                 f"{', '.join(sorted(have))}")  # fmt: skip

    def region_of(self, cloud: str, region: str) -> Region | None:
        """Where (cloud, region) is, or None when the catalog has no location for it."""
        return self.regions.get((cloud.lower(), region))


def _choices(value: str | None) -> set[str]:
    return {v.strip().lower() for v in value.split(",") if v.strip()} if value else set()


def market_price(o: Offering, spot: bool | None) -> float | None:
    """$/h on the given market; with spot None, the cheaper market that sells it."""
    if spot is None:
        prices = [p for p in (o.price, o.spot_price) if p is not None]
        return min(prices) if prices else None
    return o.hourly(spot)
