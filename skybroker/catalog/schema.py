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
