"""Roofline step times and memory fit for one engine replica on some hardware.

A step of the engine runs a batch of `num_prefill_tokens` prompt tokens and `num_decode_seqs`
decode tokens over `total_context_tokens` KV-cache tokens. Its time is the larger of compute
time (FLOPs / (peak x compute efficiency)) and memory time (weights + KV bytes / (bandwidth x
memory efficiency)), plus tensor-parallel all-reduces and the engine's host time per step
(scheduler, input preparation, op dispatch, outputs: `overhead_s` + `overhead_per_seq_s` x
sequences). Unless given, the host time is the engine's as measured by
benchmarks/host_overhead.py on the narrow models, where the arithmetic is negligible
(`catalogs/profiles/host/engine-host-overhead.json`, a function of layers and batch, with the
CPU it ran on): compiled for GPUs, where the engine compiles its step by default. The efficiency factors are the usual
calibrated values of serving engines on GPUs (~50-60% MFU in prefill, ~80% of HBM bandwidth
in decode); a measured profile (`skybroker.perf.profile`) replaces all of this.

CPU replicas (infra "local") run the engine in fp32 on this machine: their peak FLOP/s and
memory bandwidth are measured once on one thread (`cpu_hardware()`) and cached.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from skybroker.models import DTYPE_BYTES, ModelArch

GIB = 1024**3
# The catalog's interconnect figures are both directions together (NVLink 4: 900 GB/s; PCIe
# 4.0 x16: 64 GB/s); a ring all-reduce moves data one way per link, at about 85-90% of the
# link's rate (P2P writes between RTX PRO 6000 GPUs on PCIe 5.0 x16 measure ~54-56 of 63
# GB/s one way, github.com/voipmonitor/rtx6kpro hardware/pcie-bandwidth.md). So the
# all-reduce runs at this fraction of the catalog's figure: ~27 GB/s on a PCIe 4.0 GPU, not 64.
ALLREDUCE_BUS_FRACTION = 0.5 * 0.85


@dataclass(frozen=True, slots=True)
class Hardware:
    """The devices of one replica: `count` GPUs (tensor parallel) or `count` CPU cores."""

    kind: str  # "gpu" | "cpu"
    name: str  # GPU kind ("H100") or CPU model
    count: int
    memory_gib: float  # per GPU; for a CPU the RAM given to the replica
    bandwidth_gbs: float  # per GPU; for a CPU the whole socket's measured copy bandwidth
    tflops: float  # per GPU at bf16 (CPU: measured fp32, all cores given)
    interconnect_gbs: float = 0.0

    @property
    def tag(self) -> str:
        """Profile-matching tag: `gpu:H100x2`, `cpu:AMD EPYC:2`."""
        return (
            f"gpu:{self.name}x{self.count}"
            if self.kind == "gpu"
            else f"cpu:{self.name}:{self.count}"
        )


@dataclass(frozen=True, slots=True)
class RooflineModel:
    """Step time of one replica from the roofline. Frozen: its fields are its cache key."""

    arch: ModelArch
    hw: Hardware
    compute_eff: float = 0.55
    memory_eff: float = 0.80
    overhead_s: float | None = None  # None: the measured host time (engine_host_overhead)
    allreduce_latency_s: float = 10e-6
    overhead_per_seq_s: float | None = None

    def __post_init__(self) -> None:
        if self.overhead_s is None or self.overhead_per_seq_s is None:
            base, per_seq = engine_host_overhead(self.arch.num_layers, "compiled")
            if self.overhead_s is None:
                object.__setattr__(self, "overhead_s", base)
            if self.overhead_per_seq_s is None:
                object.__setattr__(self, "overhead_per_seq_s", per_seq)

    def host_s(self, num_seqs: float) -> float:
        """The engine's host time of a step of `num_seqs` sequences."""
        return self.overhead_s + self.overhead_per_seq_s * num_seqs

    @property
    def source(self) -> str:
        return "roofline"

    @property
    def cache_key(self) -> list:
        """What decides the step times: names left out, so GPU kinds with the same figures (and
        renamed copies of a model) share their capacity results."""
        d = asdict(self)
        d["arch"].pop("name")
        d["hw"].pop("name")
        return (
            sorted(d["arch"].items())
            + sorted(d["hw"].items())
            + [
                self.compute_eff,
                self.memory_eff,
                self.overhead_s,
                self.allreduce_latency_s,
                self.overhead_per_seq_s,
            ]
        )

    def step_time(self, num_prefill_tokens: float, num_decode_seqs: float,
                  total_context_tokens: float, prefill_attn_pairs: float = 0.0) -> float:  # fmt: skip
        """Seconds for one engine step; `prefill_attn_pairs` = (query, key) pairs of the
        prompt tokens (decode tokens attend to their whole context, counted in the third).
        Works elementwise on numpy arrays too."""
        a, hw = self.arch, self.hw
        tokens = num_prefill_tokens + num_decode_seqs
        tp = hw.count if hw.kind == "gpu" else 1
        decode_pairs = np.maximum(total_context_tokens - num_prefill_tokens, 0.0)
        flops = 2.0 * a.num_matmul_params * tokens + a.attention_flops(
            prefill_attn_pairs + decode_pairs
        )
        mem = a.weight_bytes + a.kv_bytes_per_token(self.kv_dtype_bytes) * total_context_tokens
        t_compute = flops / (tp * hw.tflops * 1e12 * self.compute_eff)
        t_memory = mem / (tp * hw.bandwidth_gbs * 1e9 * self.memory_eff)
        t = np.maximum(t_compute, t_memory) + self.host_s(np.maximum(num_decode_seqs, 1))
        if tp > 1:  # two ring all-reduces of the activations per layer
            nbytes = tokens * a.hidden_size * DTYPE_BYTES[a.dtype]
            per = (
                2 * (tp - 1) / tp * nbytes / (hw.interconnect_gbs * 1e9 * ALLREDUCE_BUS_FRACTION)
                + self.allreduce_latency_s
            )
            t = t + 2 * a.num_layers * per
        return t

    def fast_step(self) -> Callable[[float, float, float, float], float]:
        """`step_time` on scalars with every constant computed once (the simulator's hot path)."""
        a, hw = self.arch, self.hw
        tp = hw.count if hw.kind == "gpu" else 1
        mm2 = 2.0 * a.num_matmul_params
        attn = a.attention_flops(1.0) - a.attention_flops(0.0)
        attn0 = a.attention_flops(0.0)
        inv_c = 1.0 / (tp * hw.tflops * 1e12 * self.compute_eff)
        inv_m = 1.0 / (tp * hw.bandwidth_gbs * 1e9 * self.memory_eff)
        w, kvb, oh = a.weight_bytes, a.kv_bytes_per_token(self.kv_dtype_bytes), self.overhead_s
        ohs = self.overhead_per_seq_s
        ar_per_tok = ar0 = 0.0
        if tp > 1:
            ar_per_tok = (2 * a.num_layers * 2 * (tp - 1) / tp * a.hidden_size
                          * DTYPE_BYTES[a.dtype]
                          / (hw.interconnect_gbs * 1e9 * ALLREDUCE_BUS_FRACTION))  # fmt: skip
            ar0 = 2 * a.num_layers * self.allreduce_latency_s

        def step(p: float, d: float, c: float, pairs: float = 0.0) -> float:
            tokens = p + d
            dec_pairs = c - p if c > p else 0.0
            tc = (mm2 * tokens + attn0 + attn * (pairs + dec_pairs)) * inv_c
            tm = (w + kvb * c) * inv_m
            host = oh + ohs * (d if d > 1 else 1)
            return (tc if tc > tm else tm) + host + (ar_per_tok * tokens + ar0 if tp > 1 else 0.0)

        return step

    @property
    def kv_dtype_bytes(self) -> float:
        return min(DTYPE_BYTES[self.arch.dtype], 2.0) if self.hw.kind == "gpu" else 4.0


def activation_reserve_bytes(arch: ModelArch, max_num_batched_tokens: int) -> float:
    """Peak activations of the largest step, as vLLM's memory profiling would reserve."""
    width = 4 * arch.hidden_size + 2 * arch.intermediate_size
    return 0.5 * GIB + max_num_batched_tokens * width * DTYPE_BYTES[arch.dtype]


def kv_capacity_tokens(arch: ModelArch, hw: Hardware, *, gpu_memory_utilization: float = 0.9,
                       max_num_batched_tokens: int = 8192, kv_cache_gib: float | None = None,
                       kv_dtype_bytes: float | None = None) -> int:  # fmt: skip
    """KV-cache tokens one replica holds after weights and activations; <= 0 if it does not fit."""
    if kv_dtype_bytes is None:
        kv_dtype_bytes = min(DTYPE_BYTES[arch.dtype], 2.0) if hw.kind == "gpu" else 4.0
    per_token = arch.kv_bytes_per_token(kv_dtype_bytes)
    if hw.kind == "cpu":
        free = hw.memory_gib * GIB - arch.weight_bytes - activation_reserve_bytes(arch, 2048)
        kv = kv_cache_gib * GIB if kv_cache_gib else min(free, 4 * GIB)
        return int(min(kv, free) // per_token)
    usable = hw.count * hw.memory_gib * GIB * gpu_memory_utilization
    free = (
        usable
        - arch.weight_bytes
        - hw.count * activation_reserve_bytes(arch, max_num_batched_tokens)
    )
    return int(free // per_token)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _matmul_seconds(n: int) -> Callable[[], float]:
    """One timed n x n fp32 matmul on one thread: torch's (the engine's own kernels, one
    torch thread per local engine process) when installed, else numpy's."""
    try:
        import torch
    except ImportError:
        a = np.random.default_rng(0).random((n, n), dtype=np.float32)

        def run() -> float:
            t0 = time.perf_counter()
            a @ a
            return time.perf_counter() - t0

        return run
    t = torch.rand(n, n, generator=torch.Generator().manual_seed(0))

    def run() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            t @ t
            return time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)

    return run


def _measure_cpu() -> tuple[float, float]:
    """(fp32 TFLOP/s of one core, copy GB/s) of this machine, best of many short runs.

    One thread, so the figure is a core's and other processes on the machine can only slow a
    run down, not every run: numpy's multi-threaded BLAS measured 5x low on a loaded 2-vCPU
    VM (one thread descheduled stalls the rest) and the cache kept that figure."""
    n = 384
    matmul = _matmul_seconds(n)
    matmul()  # warm-up: first call allocates and picks kernels
    best_mm = min(matmul() for _ in range(40))
    src = np.ones(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB
    dst = np.empty_like(src)
    best_cp = math.inf
    for _ in range(10):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best_cp = min(best_cp, time.perf_counter() - t0)
    return 2 * n**3 / best_mm / 1e12, 2 * src.nbytes / best_cp / 1e9


def skybroker_home() -> Path:
    return Path(os.environ.get("SKYBROKER_HOME", Path.home() / ".skybroker"))


# Part of the cache key: a cache from an earlier way of measuring is measured again.
CPU_MEASURE_VERSION = "one-thread-v2"


def cpu_hardware(cores: int | None = None, memory_gib: float | None = None) -> Hardware:
    """This machine as a replica's hardware; FLOP/s and bandwidth measured once and cached."""
    cores = cores or os.cpu_count() or 1
    if memory_gib is None:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    name = cpu_model_name()
    cache = skybroker_home() / "cpu_roofline.json"
    key = f"{name}:{cores}:{CPU_MEASURE_VERSION}"
    data: dict = {}
    if cache.is_file():
        data = json.loads(cache.read_text())
    if key not in data:
        tflops, gbs = _measure_cpu()
        data[key] = {"tflops_per_core": tflops, "bandwidth_gbs": gbs}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data, indent=1))
    m = data[key]
    return Hardware(
        "cpu", name, cores, memory_gib, m["bandwidth_gbs"], m["tflops_per_core"] * cores
    )


def cpu_roofline(arch: ModelArch, hw: Hardware) -> RooflineModel:
    """The roofline of our engine on CPU: torch fp32 reaches a fraction of numpy's matmul peak
    and pays the eager engine's host time (CPU replicas run eager by default) in every step."""
    fp32 = ModelArch(**{**asdict(arch), "dtype": "float32", "weight_bytes_override": None})
    base, per_seq = engine_host_overhead(arch.num_layers, "eager")
    return RooflineModel(fp32, hw, compute_eff=0.8, memory_eff=0.8, overhead_s=base,
                         overhead_per_seq_s=per_seq)  # fmt: skip


def _host_overhead_file() -> Path:
    from skybroker.catalog.loader import BUNDLED_DIR

    return BUNDLED_DIR / "profiles" / "host" / "engine-host-overhead.json"


# Used when the file is missing (a wheel without it): the figures it held when written.
_HOST_FALLBACK = {"compiled": [0.004, 0.0, 0.0, 0.0], "eager": [0.002, 0.0003, 0.0, 0.0]}


def engine_host_overhead(num_layers: int, step: str = "compiled") -> tuple[float, float]:
    """(seconds per step, seconds per sequence per step) of the engine's host work for a model
    of `num_layers`, from the recorded fit host = a + b*layers + (c + d*layers)*sequences."""
    fits = _host_fits()
    a, b, c, d = fits.get(step) or _HOST_FALLBACK[step]
    return a + b * num_layers, c + d * num_layers


_HOST_FITS: dict | None = None


def _host_fits() -> dict:
    global _HOST_FITS
    if _HOST_FITS is None:
        try:
            data = json.loads(_host_overhead_file().read_text())
            _HOST_FITS = {k: v["fit"] for k, v in data["steps"].items()}
        except (OSError, ValueError, KeyError):
            _HOST_FITS = {}
    return _HOST_FITS
