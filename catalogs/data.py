"""Hand-entered tables behind the bundled snapshot (read by catalogs/build_snapshot.py).

Every figure here is transcribed from a public source named in catalogs/README.md; the
comments say which. Nothing in this file is imported by skybroker at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_HEADER = (
    "name", "vendor", "memory_gib", "memory_bandwidth_gbs", "fp16_tflops", "fp8_tflops",
    "interconnect", "interconnect_gbs",
)  # fmt: skip
REGION_HEADER = ("cloud", "region", "city", "country", "lat", "lon", "area")
EGRESS_HEADER = ("cloud", "internet_per_gb", "inter_region_per_gb", "inter_area_per_gb")
SOURCE_HEADER = ("cloud", "file", "as_of", "source")

# name: (vendor, memory GB, bandwidth GB/s, dense fp16/bf16 TFLOP/s, dense fp8, link, link GB/s)
# Spec-sheet figures (see catalogs/README.md "GPU specs" for sources and unconfirmed cells).
GPUS: dict[str, tuple[str, float, float, float, float | None, str, float]] = {
    "T4": ("nvidia", 16, 320, 65, None, "pcie", 32),
    "L4": ("nvidia", 24, 300, 121, 242, "pcie", 64),
    "A10": ("nvidia", 24, 600, 125, None, "pcie", 64),
    "A10G": ("nvidia", 24, 600, 70, None, "pcie", 64),  # AWS variant: less tensor compute than A10
    "A40": ("nvidia", 48, 696, 150, None, "pcie", 64),
    "L40": ("nvidia", 48, 864, 181, 362, "pcie", 64),
    "L40S": ("nvidia", 48, 864, 362, 733, "pcie", 64),
    "A6000": ("nvidia", 48, 768, 155, None, "pcie", 64),
    "RTX6000": ("nvidia", 24, 672, 130, None, "pcie", 32),
    "V100": ("nvidia", 16, 900, 125, None, "nvlink", 300),
    "V100-32GB": ("nvidia", 32, 900, 125, None, "nvlink", 300),
    "A100": ("nvidia", 40, 1555, 312, None, "nvlink", 600),
    "A100-80GB": ("nvidia", 80, 2039, 312, None, "nvlink", 600),
    "H100": ("nvidia", 80, 3350, 989, 1979, "nvlink", 900),
    "H100-MEGA": ("nvidia", 80, 3350, 989, 1979, "nvlink", 900),  # GCP a3-mega: H100 SXM
    "H200": ("nvidia", 141, 4800, 989, 1979, "nvlink", 900),
    "GH200": ("nvidia", 96, 4000, 989, 1979, "nvlink", 900),
    "B200": ("nvidia", 180, 8000, 2250, 4500, "nvlink", 1800),
}
GPU_MEMORY_GIB = {name: spec[1] for name, spec in GPUS.items()}

# GCP host VMs with a built-in GPU: instance type -> (GPU kind, count).
GCP_BUILTIN_GPU: dict[str, tuple[str, int]] = {
    "a2-highgpu-1g": ("A100", 1),
    "a2-highgpu-2g": ("A100", 2),
    "a2-highgpu-4g": ("A100", 4),
    "a2-highgpu-8g": ("A100", 8),
    "a2-megagpu-16g": ("A100", 16),
    "a2-ultragpu-1g": ("A100-80GB", 1),
    "a2-ultragpu-2g": ("A100-80GB", 2),
    "a2-ultragpu-4g": ("A100-80GB", 4),
    "a2-ultragpu-8g": ("A100-80GB", 8),
    "a3-highgpu-1g": ("H100", 1),
    "a3-highgpu-2g": ("H100", 2),
    "a3-highgpu-4g": ("H100", 4),
    "a3-edgegpu-8g": ("H100", 8),
}


@dataclass(frozen=True)
class HostEstimate:
    """A GCP GPU VM whose host price is estimated from per-vCPU and per-GiB rates."""

    instance_type: str
    gpu: str
    count: int
    vcpus: float
    memory_gib: float
    vcpu_rate: float  # $/vCPU-hour in us-central1
    mem_rate: float  # $/GiB-hour in us-central1


# us-central1 list rates: N1 predefined vCPU 0.031611, RAM 0.004237; G2 vCPU 0.024988,
# RAM 0.002927 (g2-standard-4 = 0.70683 $/h incl. one L4 at 0.56004). a3-mega/ultra and a4
# hosts use the a3-edgegpu-8g host price per vCPU (208 vCPU / 1872 GiB = 9.46006 $/h)
# expressed as G2-shaped rates scaled by 0.886 -- an estimate, flagged in the README.
_N1 = (0.031611, 0.004237)
_G2 = (0.024988, 0.002927)
_A3 = (0.022140, 0.002593)
GCP_ESTIMATED_HOSTS = [
    HostEstimate("n1-standard-4", "T4", 1, 4, 15, *_N1),
    HostEstimate("n1-standard-8", "T4", 2, 8, 30, *_N1),
    HostEstimate("n1-standard-16", "T4", 4, 16, 60, *_N1),
    HostEstimate("n1-highmem-8", "V100", 1, 8, 52, *_N1),
    HostEstimate("n1-highmem-16", "V100", 2, 16, 104, *_N1),
    HostEstimate("g2-standard-4", "L4", 1, 4, 16, *_G2),
    HostEstimate("g2-standard-8", "L4", 1, 8, 32, *_G2),
    HostEstimate("g2-standard-12", "L4", 1, 12, 48, *_G2),
    HostEstimate("g2-standard-16", "L4", 1, 16, 64, *_G2),
    HostEstimate("g2-standard-24", "L4", 2, 24, 96, *_G2),
    HostEstimate("g2-standard-48", "L4", 4, 48, 192, *_G2),
    HostEstimate("g2-standard-96", "L4", 8, 96, 384, *_G2),
    HostEstimate("a3-megagpu-8g", "H100-MEGA", 8, 208, 1872, *_A3),
    HostEstimate("a3-ultragpu-8g", "H200", 8, 224, 2952, *_A3),
    HostEstimate("a4-highgpu-8g", "B200", 8, 224, 3968, *_A3),
]

# AWS families missing from the SkyPilot extract: on-demand list prices, identical in
# us-east-1 / us-east-2 / us-west-2 (AWS EC2 on-demand pricing page, Linux). No spot figure.
_AWS_US = ("us-east-1", "us-east-2", "us-west-2")
AWS_EXTRA = [
    ("g4dn.xlarge", "T4", 1, 4, 16, 0.526, None, _AWS_US),
    ("g4dn.2xlarge", "T4", 1, 8, 32, 0.752, None, _AWS_US),
    ("g4dn.4xlarge", "T4", 1, 16, 64, 1.204, None, _AWS_US),
    ("g4dn.8xlarge", "T4", 1, 32, 128, 2.176, None, _AWS_US),
    ("g4dn.12xlarge", "T4", 4, 48, 192, 3.912, None, _AWS_US),
    ("g4dn.16xlarge", "T4", 1, 64, 256, 4.352, None, _AWS_US),
    ("g5.2xlarge", "A10G", 1, 8, 32, 1.212, None, _AWS_US),
    ("g5.4xlarge", "A10G", 1, 16, 64, 1.624, None, _AWS_US),
    ("g5.12xlarge", "A10G", 4, 48, 192, 5.672, None, _AWS_US),
    ("g5.16xlarge", "A10G", 1, 64, 256, 4.096, None, _AWS_US),
    ("g5.24xlarge", "A10G", 4, 96, 384, 8.144, None, _AWS_US),
    ("g5.48xlarge", "A10G", 8, 192, 768, 16.288, None, _AWS_US),
    ("g6.xlarge", "L4", 1, 4, 16, 0.8048, None, _AWS_US),
    ("g6.2xlarge", "L4", 1, 8, 32, 0.9776, None, _AWS_US),
    ("g6.4xlarge", "L4", 1, 16, 64, 1.3232, None, _AWS_US),
    ("g6.8xlarge", "L4", 1, 32, 128, 2.0144, None, _AWS_US),
    ("g6.16xlarge", "L4", 1, 64, 256, 3.3968, None, _AWS_US),
    ("g6.24xlarge", "L4", 4, 96, 384, 6.6752, None, _AWS_US),
    ("g6.48xlarge", "L4", 8, 192, 768, 13.3504, None, _AWS_US),
]

# Azure: SkyPilot catalog v6/azure/vms.csv (skypilot-org/skypilot-catalog, commit 098741e7),
# rows of GPU VM sizes in the US regions it covers, Linux pay-as-you-go and spot $/h.
# instance: (gpu, count, vcpus, mem, {region: (price, spot)})
AZURE_VMS: dict[str, tuple[str, int, float, float, dict[str, tuple[float, float | None]]]] = {
    "Standard_NC4as_T4_v3": ("T4", 1, 4, 28, {
        "centralus": (0.594, 0.06534), "eastus": (0.526, 0.062699), "eastus2": (0.526, 0.05786),
        "northcentralus": (0.526, 0.05786), "southcentralus": (0.631, 0.06941),
        "westus": (0.631, 0.06941), "westus2": (0.526, 0.061595), "westus3": (0.526, 0.05786),
    }),
    "Standard_NC8as_T4_v3": ("T4", 1, 8, 56, {
        "eastus": (0.752, 0.089638), "eastus2": (0.752, 0.08272),
        "northcentralus": (0.752, 0.08272), "southcentralus": (0.902, 0.09922),
        "westus": (0.902, 0.09922), "westus2": (0.752, 0.088059), "westus3": (0.752, 0.08272),
    }),
    "Standard_NC16as_T4_v3": ("T4", 1, 16, 110, {
        "centralus": (1.36, 0.1496), "eastus": (1.204, 0.143517), "eastus2": (1.204, 0.13244),
        "northcentralus": (1.204, 0.13244), "southcentralus": (1.445, 0.15895),
        "westus": (1.445, 0.15895), "westus2": (1.204, 0.140988), "westus3": (1.204, 0.13244),
    }),
    "Standard_NC64as_T4_v3": ("T4", 4, 64, 440, {
        "centralus": (4.907, 0.53977), "eastus": (4.352, 0.518758), "eastus2": (4.352, 0.47872),
        "northcentralus": (4.352, 0.47872), "southcentralus": (5.222, 0.57442),
        "westus": (5.222, 0.57442), "westus2": (4.352, 0.509619), "westus3": (4.352, 0.47872),
    }),
    "Standard_NV36ads_A10_v5": ("A10", 1, 36, 440, {
        "eastus": (3.2, 0.8), "eastus2": (3.2, 0.8), "northcentralus": (3.84, 0.96),
        "southcentralus": (3.84, 0.96), "westus": (4.16, 1.04), "westus2": (3.2, 0.8),
        "westus3": (3.2, 0.8),
    }),
    "Standard_NV36adms_A10_v5": ("A10", 1, 36, 880, {
        "eastus": (4.52, 1.13), "eastus2": (4.52, 1.13), "northcentralus": (5.424, 1.356),
        "southcentralus": (5.424, 1.356), "westus": (5.876, 1.469), "westus2": (4.52, 1.13),
        "westus3": (4.52, 1.13),
    }),
    "Standard_NV72ads_A10_v5": ("A10", 2, 72, 880, {
        "eastus": (6.52, 1.63), "eastus2": (6.52, 1.63), "northcentralus": (7.824, 1.956),
        "southcentralus": (7.824, 1.956), "westus": (8.476, 2.119), "westus2": (6.52, 1.63),
        "westus3": (6.52, 1.63),
    }),
    "Standard_NC6s_v3": ("V100", 1, 6, 112, {
        "centralus": (3.458, 0.394212), "eastus": (3.06, 0.3978), "eastus2": (3.06, 0.404838),
        "southcentralus": (3.366, 0.388773), "westus": (3.978, 0.459061),
        "westus2": (3.06, 0.35343), "westus3": (3.06, 0.3366),
    }),
    "Standard_NC12s_v3": ("V100", 2, 12, 224, {
        "centralus": (6.916, 0.788424), "eastus": (6.12, 0.7956), "eastus2": (6.12, 0.809676),
        "southcentralus": (6.732, 0.777546), "westus": (7.956, 0.918122),
        "westus2": (6.12, 0.70686), "westus3": (6.12, 0.6732),
    }),
    "Standard_NC24s_v3": ("V100", 4, 24, 448, {
        "centralus": (13.831, 1.576734), "eastus": (12.24, 1.5912), "eastus2": (12.24, 1.619352),
        "southcentralus": (13.464, 1.555092), "westus": (15.912, 1.836245),
        "westus2": (12.24, 1.41372), "westus3": (12.24, 1.3464),
    }),
    "Standard_ND40rs_v2": ("V100-32GB", 8, 40, 672, {
        "eastus": (22.032, 2.42352), "southcentralus": (26.438, 2.90818),
        "westus2": (22.032, 2.42352),
    }),
    "Standard_NC24ads_A100_v4": ("A100-80GB", 1, 24, 220, {
        "centralus": (4.15, 0.4565), "eastus": (3.673, 0.444433), "eastus2": (3.673, 0.47749),
        "southcentralus": (4.408, 0.57304), "westus": (4.775, 0.647968),
        "westus2": (3.673, 0.615962), "westus3": (3.673, 0.40403),
    }),
    "Standard_NC48ads_A100_v4": ("A100-80GB", 2, 48, 440, {
        "centralus": (8.301, 0.91311), "eastus": (7.346, 0.888866), "eastus2": (7.346, 0.95498),
        "southcentralus": (8.815, 1.14595), "westus": (9.55, 1.295935),
        "westus2": (7.346, 1.231924), "westus3": (7.346, 0.80806),
    }),
    "Standard_NC96ads_A100_v4": ("A100-80GB", 4, 96, 880, {
        "centralus": (16.602, 1.82622), "eastus": (14.692, 1.777732),
        "eastus2": (14.692, 1.90996), "southcentralus": (17.63, 2.2919),
        "westus": (19.1, 2.59187), "westus2": (14.692, 2.463848), "westus3": (14.692, 1.61612),
    }),
    "Standard_ND96asr_v4": ("A100", 8, 96, 900, {
        "eastus": (27.197, 2.99167), "southcentralus": (32.63, 3.5893),
        "westus2": (27.197, 2.99167),
    }),
    "Standard_ND96amsr_A100_v4": ("A100-80GB", 8, 96, 1800, {
        "eastus": (32.77, 3.6047), "eastus2": (32.77, 3.611254),
        "southcentralus": (39.324, 4.32564),
    }),
    # H100 rows: the source repeats on-demand as spot (no spot market): spot dropped below.
    # ND96isr_H100_v5 has 8 H100 (the source's count of 12 is wrong).
    "Standard_NC40ads_H100_v5": ("H100", 1, 40, 320, {
        "eastus": (6.98, 6.98), "eastus2": (6.98, 6.98), "southcentralus": (8.38, 8.38),
        "westus3": (6.98, 6.98),
    }),
    "Standard_NC80adis_H100_v5": ("H100", 2, 80, 640, {
        "eastus": (13.96, 13.96), "eastus2": (13.96, 13.96), "southcentralus": (16.76, 16.76),
        "westus3": (13.96, 13.96),
    }),
    "Standard_ND96isr_H100_v5": ("H100", 8, 96, 1900, {
        "eastus": (98.32, 98.32), "eastus2": (98.32, 98.32), "westus": (127.816, 127.816),
    }),
}  # fmt: skip

# RunPod secure cloud: SkyPilot catalog v8/runpod/vms.csv (commit 01acdfd4); prices are per
# GPU and linear in the count; vCPUs and RAM per GPU as listed. Region = country code (as
# SkyPilot models RunPod); every type is listed in every country. No separate spot price.
RUNPOD_REGIONS = (
    "US",
    "CA",
    "CZ",
    "DK",
    "FR",
    "NL",
    "NO",
    "RO",
    "SE",
    "IS",
    "JP",
    "IN",
    "AU",
    "SG",
)
# SkyPilot accelerator name, our GPU kind, $/GPU-hour, vCPUs per GPU, GiB RAM per GPU
RUNPOD_GPUS = [
    ("H100-SXM", "H100", 3.29, 20, 125),
    ("A100-80GB", "A100-80GB", 1.39, 8, 117),
    ("L40", "L40", 0.82, 9, 125),
    ("A40", "A40", 0.44, 9, 48),
    ("RTXA6000", "A6000", 0.53, 8, 50),
]
RUNPOD_COUNTS = (1, 2, 4, 8)


def azure_rows() -> list[tuple]:
    """AZURE_VMS as (instance, gpu, count, vcpus, mem, price, spot, [region]) tuples."""
    out = []
    for itype, (gpu, count, vcpus, mem, prices) in AZURE_VMS.items():
        for region, (price, spot) in prices.items():
            if spot is not None and spot >= price:
                spot = None  # no spot discount listed: treat as not sold as spot
            out.append((itype, gpu, count, vcpus, mem, price, spot, [region]))
    return out


def runpod_rows() -> list[tuple]:
    """RunPod types (as SkyPilot names them) in every listed country."""
    out = []
    for sky_name, gpu, per_gpu, vcpus, mem in RUNPOD_GPUS:
        for n in RUNPOD_COUNTS:
            itype = f"{n}x_{sky_name}_SECURE"
            out.append(
                (itype, gpu, n, vcpus * n, mem * n, round(per_gpu * n, 4), None, RUNPOD_REGIONS)
            )
    return out


AZURE = azure_rows()
RUNPOD = runpod_rows()

# (cloud, region, city, country, lat, lon, area). Approximate city coordinates of each
# region's public location (provider docs name the metro; coordinates are the city's).
REGIONS: list[tuple[str, str, str, str, float, float, str]] = [
    ("aws", "us-east-1", "Ashburn VA", "US", 39.04, -77.49, "us"),
    ("aws", "us-east-2", "Columbus OH", "US", 39.96, -83.00, "us"),
    ("aws", "us-west-1", "San Jose CA", "US", 37.35, -121.96, "us"),
    ("aws", "us-west-2", "Boardman OR", "US", 45.84, -119.70, "us"),
    ("aws", "ca-central-1", "Montreal", "CA", 45.50, -73.57, "ca"),
    ("aws", "eu-west-1", "Dublin", "IE", 53.35, -6.26, "eu"),
    ("aws", "eu-west-2", "London", "GB", 51.51, -0.13, "eu"),
    ("aws", "eu-west-3", "Paris", "FR", 48.86, 2.35, "eu"),
    ("aws", "eu-central-1", "Frankfurt", "DE", 50.11, 8.68, "eu"),
    ("aws", "eu-north-1", "Stockholm", "SE", 59.33, 18.07, "eu"),
    ("aws", "eu-south-2", "Zaragoza", "ES", 41.65, -0.88, "eu"),
    ("aws", "me-central-1", "Dubai", "AE", 25.20, 55.27, "me"),
    ("aws", "ap-east-1", "Hong Kong", "HK", 22.32, 114.17, "asia"),
    ("aws", "ap-northeast-1", "Tokyo", "JP", 35.68, 139.69, "asia"),
    ("aws", "ap-northeast-2", "Seoul", "KR", 37.57, 126.98, "asia"),
    ("aws", "ap-northeast-3", "Osaka", "JP", 34.69, 135.50, "asia"),
    ("aws", "ap-south-1", "Mumbai", "IN", 19.08, 72.88, "asia"),
    ("aws", "ap-southeast-1", "Singapore", "SG", 1.35, 103.82, "asia"),
    ("aws", "ap-southeast-2", "Sydney", "AU", -33.87, 151.21, "oceania"),
    ("aws", "ap-southeast-3", "Jakarta", "ID", -6.21, 106.85, "asia"),
    ("gcp", "us-central1", "Council Bluffs IA", "US", 41.26, -95.86, "us"),
    ("gcp", "us-east1", "Moncks Corner SC", "US", 33.20, -80.01, "us"),
    ("gcp", "us-east4", "Ashburn VA", "US", 39.04, -77.49, "us"),
    ("gcp", "us-east5", "Columbus OH", "US", 39.96, -83.00, "us"),
    ("gcp", "us-south1", "Dallas TX", "US", 32.78, -96.80, "us"),
    ("gcp", "us-west1", "The Dalles OR", "US", 45.59, -121.18, "us"),
    ("gcp", "us-west2", "Los Angeles CA", "US", 34.05, -118.24, "us"),
    ("gcp", "us-west3", "Salt Lake City UT", "US", 40.76, -111.89, "us"),
    ("gcp", "us-west4", "Las Vegas NV", "US", 36.17, -115.14, "us"),
    ("gcp", "northamerica-northeast1", "Montreal", "CA", 45.50, -73.57, "ca"),
    ("gcp", "northamerica-northeast2", "Toronto", "CA", 43.65, -79.38, "ca"),
    ("gcp", "southamerica-east1", "Sao Paulo", "BR", -23.55, -46.63, "sa"),
    ("gcp", "europe-west1", "St. Ghislain", "BE", 50.45, 3.82, "eu"),
    ("gcp", "europe-west2", "London", "GB", 51.51, -0.13, "eu"),
    ("gcp", "europe-west3", "Frankfurt", "DE", 50.11, 8.68, "eu"),
    ("gcp", "europe-west4", "Eemshaven", "NL", 53.44, 6.83, "eu"),
    ("gcp", "europe-west6", "Zurich", "CH", 47.38, 8.54, "eu"),
    ("gcp", "europe-west9", "Paris", "FR", 48.86, 2.35, "eu"),
    ("gcp", "europe-central2", "Warsaw", "PL", 52.23, 21.01, "eu"),
    ("gcp", "europe-north1", "Hamina", "FI", 60.57, 27.20, "eu"),
    ("gcp", "me-west1", "Tel Aviv", "IL", 32.09, 34.78, "me"),
    ("gcp", "me-central2", "Dammam", "SA", 26.43, 50.10, "me"),
    ("gcp", "asia-east1", "Changhua County", "TW", 24.07, 120.54, "asia"),
    ("gcp", "asia-east2", "Hong Kong", "HK", 22.32, 114.17, "asia"),
    ("gcp", "asia-northeast1", "Tokyo", "JP", 35.68, 139.69, "asia"),
    ("gcp", "asia-northeast3", "Seoul", "KR", 37.57, 126.98, "asia"),
    ("gcp", "asia-south1", "Mumbai", "IN", 19.08, 72.88, "asia"),
    ("gcp", "asia-south2", "Delhi", "IN", 28.61, 77.21, "asia"),
    ("gcp", "asia-southeast1", "Jurong West", "SG", 1.34, 103.71, "asia"),
    ("gcp", "asia-southeast2", "Jakarta", "ID", -6.21, 106.85, "asia"),
    ("gcp", "australia-southeast1", "Sydney", "AU", -33.87, 151.21, "oceania"),
    ("azure", "eastus", "Boydton VA", "US", 36.67, -78.39, "us"),
    ("azure", "eastus2", "Boydton VA", "US", 36.67, -78.39, "us"),
    ("azure", "centralus", "Des Moines IA", "US", 41.59, -93.62, "us"),
    ("azure", "northcentralus", "Chicago IL", "US", 41.88, -87.63, "us"),
    ("azure", "southcentralus", "San Antonio TX", "US", 29.42, -98.49, "us"),
    ("azure", "westus", "San Francisco CA", "US", 37.77, -122.42, "us"),
    ("azure", "westus2", "Quincy WA", "US", 47.23, -119.85, "us"),
    ("azure", "westus3", "Phoenix AZ", "US", 33.45, -112.07, "us"),
    # Lambda names its regions by area; the cities are assumptions (see README).
    ("lambda", "us-east-1", "Ashburn VA", "US", 39.04, -77.49, "us"),
    ("lambda", "us-east-2", "Washington DC", "US", 38.90, -77.04, "us"),
    ("lambda", "us-east-3", "Atlanta GA", "US", 33.75, -84.39, "us"),
    ("lambda", "us-midwest-1", "Chicago IL", "US", 41.88, -87.63, "us"),
    ("lambda", "us-south-1", "Dallas TX", "US", 32.78, -96.80, "us"),
    ("lambda", "us-south-2", "Houston TX", "US", 29.76, -95.37, "us"),
    ("lambda", "us-south-3", "Austin TX", "US", 30.27, -97.74, "us"),
    ("lambda", "us-west-1", "San Francisco CA", "US", 37.77, -122.42, "us"),
    ("lambda", "us-west-2", "Phoenix AZ", "US", 33.45, -112.07, "us"),
    ("lambda", "us-west-3", "Salt Lake City UT", "US", 40.76, -111.89, "us"),
    ("lambda", "europe-central-1", "Frankfurt", "DE", 50.11, 8.68, "eu"),
    ("lambda", "europe-south-1", "Milan", "IT", 45.46, 9.19, "eu"),
    ("lambda", "me-west-1", "Tel Aviv", "IL", 32.09, 34.78, "me"),
    ("lambda", "asia-northeast-1", "Tokyo", "JP", 35.68, 139.69, "asia"),
    ("lambda", "asia-northeast-2", "Seoul", "KR", 37.57, 126.98, "asia"),
    ("lambda", "asia-south-1", "Bangalore", "IN", 12.97, 77.59, "asia"),
    ("lambda", "australia-east-1", "Sydney", "AU", -33.87, 151.21, "oceania"),
    # RunPod regions are countries; the point is its listed data centre's metro
    # (US: geographic centre of the listed US data centres, coarse for RTT).
    ("runpod", "US", "Kansas City (US centre)", "US", 39.10, -94.58, "us"),
    ("runpod", "CA", "Montreal", "CA", 45.50, -73.57, "ca"),
    ("runpod", "CZ", "Prague", "CZ", 50.08, 14.44, "eu"),
    ("runpod", "DK", "Copenhagen", "DK", 55.68, 12.57, "eu"),
    ("runpod", "FR", "Paris", "FR", 48.86, 2.35, "eu"),
    ("runpod", "NL", "Amsterdam", "NL", 52.37, 4.90, "eu"),
    ("runpod", "NO", "Oslo", "NO", 59.91, 10.75, "eu"),
    ("runpod", "RO", "Bucharest", "RO", 44.43, 26.10, "eu"),
    ("runpod", "SE", "Stockholm", "SE", 59.33, 18.07, "eu"),
    ("runpod", "IS", "Reykjavik", "IS", 64.15, -21.94, "eu"),
    ("runpod", "JP", "Tokyo", "JP", 35.68, 139.69, "asia"),
    ("runpod", "IN", "Mumbai", "IN", 19.08, 72.88, "asia"),
    ("runpod", "AU", "Sydney", "AU", -33.87, 151.21, "oceania"),
    ("runpod", "SG", "Singapore", "SG", 1.35, 103.82, "asia"),
]

# cloud: (internet $/GB, inter-region $/GB within an area, between areas $/GB)
EGRESS = {
    "aws": (0.09, 0.02, 0.02),
    "gcp": (0.12, 0.02, 0.05),
    "azure": (0.087, 0.02, 0.05),
    "lambda": (0.0, 0.0, 0.0),
    "runpod": (0.0, 0.0, 0.0),
}

SOURCES = [
    (
        "aws",
        "offerings.csv",
        "2025-11",
        "skypilot-org/skypilot-catalog catalogs/v9/aws/vms.csv @2c3d7ea7 (late-2025 snapshot); "
        "g4dn/g5/g6 sizes from the AWS EC2 on-demand price list",
    ),
    (
        "gcp",
        "offerings.csv",
        "2025-11",
        "skypilot-org/skypilot-catalog catalogs/v9/gcp/vms.csv @2c3d7ea7: host VM + accelerator",
    ),
    (
        "lambda",
        "offerings.csv",
        "2025-11",
        "skypilot-org/skypilot-catalog catalogs/v9/lambda/vms.csv @2c3d7ea7",
    ),
    (
        "azure",
        "offerings.csv",
        "2024",
        "skypilot-org/skypilot-catalog catalogs/v6/azure/vms.csv @098741e7 (Azure Retail Prices API)",
    ),
    (
        "runpod",
        "offerings.csv",
        "2025",
        "skypilot-org/skypilot-catalog catalogs/v8/runpod/vms.csv @01acdfd4",
    ),
]


def gpu_rows() -> list[dict[str, object]]:
    return [
        dict(zip(GPU_HEADER, (name, *spec), strict=True)) for name, spec in sorted(GPUS.items())
    ]


def region_rows() -> list[dict[str, object]]:
    return [dict(zip(REGION_HEADER, r, strict=True)) for r in REGIONS]


def egress_rows() -> list[dict[str, object]]:
    return [dict(zip(EGRESS_HEADER, (c, *v), strict=True)) for c, v in EGRESS.items()]


def source_rows() -> list[dict[str, object]]:
    return [dict(zip(SOURCE_HEADER, s, strict=True)) for s in SOURCES]
