"""One replica's configuration and performance per GPU kind: what the optimizer chooses from.

For each GPU kind the planner enumerates the deployment configurations an instance of it can
run: a tensor-parallel size `tp` whose replica fits the model and its KV cache (`engine.
tensor_parallel: auto`: every power of two up to the largest instance of that kind; a number:
that one only), and on an instance of G GPUs, G // tp replicas side by side (data parallel).
Each configuration's capacity per request class (the highest rate one replica sustains within
the SLO, by scheduler simulation on a measured profile or the roofline) is searched lazily:
until the optimum needs it, an upper bound in closed form stands in (`replica_perfs(...,
exact=False)`). Capacities are sized with headroom: on the step-time model slowed by the
plan's margin (`skybroker.perf.headroom`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from skybroker.catalog.schema import Catalog
from skybroker.models import ModelArch, from_gguf, from_hf_dir, lookup
from skybroker.perf.capacity import (
    CapacityResult,
    SLOTarget,
    max_rates,
    rate_bound,
)
from skybroker.perf.headroom import plan_margin, slowed
from skybroker.perf.profile import find_profile
from skybroker.perf.roofline import (
    Hardware,
    RooflineModel,
    cpu_hardware,
    cpu_roofline,
    kv_capacity_tokens,
)
from skybroker.perf.simulator import SchedulerConfig
from skybroker.perf.workload import RequestClass
from skybroker.spec import DeploymentSpec, ModelSpec, SpecError

# Requests per simulation of a capacity search. The p99 of 80 requests is nearly their
# maximum, and 80 arrivals at an idle replica end before its queue reaches steady state, so
# capacities came out high; 200 (bracketed by a search on 80, `capacity.COARSE_REQUESTS`)
# costs about 2.5x the search time of 80 alone.
SIM_REQUESTS = int(os.environ.get("SKYBROKER_SIM_REQUESTS", "200"))
ConfigKey = tuple[str, int]  # (GPU kind, tensor-parallel size); ("cpu", 1) for this machine
TP_SIZES = (1, 2, 4, 8, 16)


def resolve_arch(m: ModelSpec, infra: str = "skypilot") -> ModelArch:
    """The architecture from the spec's numbers, a local path, or the well-known table."""
    arch: ModelArch | None = None
    if m.architecture is not None:
        a = m.architecture
        arch = ModelArch(m.label, a.num_layers, a.hidden_size, a.num_heads,
                         a.num_kv_heads or a.num_heads, a.head_dim or a.hidden_size // a.num_heads,
                         a.intermediate_size, a.vocab_size, a.tie_word_embeddings,
                         a.max_position_embeddings)  # fmt: skip
    elif m.path:
        p = Path(m.path).expanduser()
        if p.is_dir():
            arch = from_hf_dir(p)
        elif p.is_file() and p.suffix == ".gguf":
            arch = from_gguf(p)
        elif not (m.name and lookup(m.name)):
            raise SpecError(
                f"model.path: {m.path!r} is neither a Hugging Face dir nor a .gguf file"
            )
    if arch is None and m.name:
        arch = lookup(m.name)
        if arch is None:
            from skybroker.models import KNOWN_MODELS

            known = ", ".join(a.name for a in KNOWN_MODELS.values())
            raise SpecError(f"model.name: {m.name!r} is not a model the planner knows; give "
                            f"model.path or model.architecture, or one of: {known}")  # fmt: skip
        arch = replace(arch, name=m.name)
    assert arch is not None
    return replace(arch, dtype=m.dtype) if m.dtype else arch


def required_len(spec: DeploymentSpec, arch: ModelArch, classes: list[RequestClass]) -> int:
    longest = max(i + o for c in classes for i, o in zip(c.input_lens, c.output_lens, strict=True))
    want = spec.engine.max_model_len or longest
    return min(want, arch.max_position_embeddings)


@dataclass(frozen=True)
class ReplicaPerf:
    """One replica of a configuration: its hardware, KV capacity and capacity per class."""

    hw: Hardware
    tp: int
    kv_tokens: int
    caps: tuple[CapacityResult, ...]  # per request class, on the model slowed by `margin`
    source: str
    notes: tuple[str, ...] = ()  # measured profiles skipped, and why
    exact: bool = True  # False: caps are upper bounds (`rate_bound`), not searched yet
    margin: float = 0.0  # the step-time slowdown the capacities were sized for
    step: Any = None  # the step-time model (unslowed)
    cfg: SchedulerConfig | None = None

    @property
    def config(self) -> ConfigKey:
        return (self.hw.name if self.hw.kind == "gpu" else "cpu", self.tp)


def _fits_heads(arch: ModelArch, tp: int) -> bool:
    return not (arch.num_heads % tp or (arch.num_kv_heads % tp and tp > arch.num_kv_heads))


def gpu_configs(arch: ModelArch, spec: DeploymentSpec, catalog: Catalog, gpu: str,
                max_count: int, need_len: int) -> list[tuple[Hardware, int]]:  # fmt: skip
    """(hardware of one replica, its KV tokens) for every TP size that fits, smallest first."""
    g = catalog.gpus.get(gpu)
    if g is None:
        return []
    e = spec.engine
    tps = [e.tensor_parallel] if isinstance(e.tensor_parallel, int) else TP_SIZES
    out = []
    for tp in tps:
        if tp > max_count or not _fits_heads(arch, tp):
            continue
        hw = Hardware("gpu", gpu, tp, g.memory_gib, g.memory_bandwidth_gbs, g.fp16_tflops,
                      g.interconnect_gbs)  # fmt: skip
        kv = kv_capacity_tokens(arch, hw, gpu_memory_utilization=e.gpu_memory_utilization,
                                max_num_batched_tokens=e.max_num_batched_tokens)  # fmt: skip
        if kv >= need_len:
            out.append((hw, kv))
    return out


def gpu_replica(arch: ModelArch, spec: DeploymentSpec, catalog: Catalog, gpu: str,
                max_count: int, need_len: int) -> tuple[Hardware, int] | None:  # fmt: skip
    """The smallest-TP configuration that fits (`gpu_configs`' first), or None."""
    fits = gpu_configs(arch, spec, catalog, gpu, max_count, need_len)
    return fits[0] if fits else None


def replica_perf(arch: ModelArch, hw: Hardware, kv_tokens: int, spec: DeploymentSpec,
                 classes: list[RequestClass],
                 model: RooflineModel | None = None) -> ReplicaPerf:  # fmt: skip
    return replica_perfs([(arch, hw, kv_tokens, model)], spec, classes)[0]


def slo_target(spec: DeploymentSpec) -> SLOTarget:
    s = spec.slo
    return SLOTarget(s.ttft_ms / 1000, s.tpot_ms / 1000, s.percentile)


def replica_perfs(replicas: list[tuple[ModelArch, Hardware, int, RooflineModel | None]],
                  spec: DeploymentSpec, classes: list[RequestClass], *,
                  exact: bool = True) -> list[ReplicaPerf]:  # fmt: skip
    """Capacity per request class of each replica kind: a measured profile when one matches,
    else the roofline, slowed by the plan's margin. Every distinct search runs once
    (`max_rates`, in parallel when cold). With exact=False nothing is searched: every
    capacity is an upper bound, whatever the cache holds, so that which capacities a plan
    searches, and so the plan, does not depend on what earlier plans left in the cache."""
    e, slo = spec.engine, slo_target(spec)
    steps, jobs = [], []
    for arch, hw, kv_tokens, model in replicas:
        notes: list[str] = []
        step = find_profile(arch, hw, e.profiles, notes) or model or RooflineModel(arch, hw)
        margin = plan_margin(spec.slo.margin, step.source)
        cfg = SchedulerConfig(e.max_num_seqs, e.max_num_batched_tokens,
                              kv_tokens // e.block_size, e.block_size)  # fmt: skip
        steps.append((step, notes, margin, cfg))
        jobs += [(slowed(step, margin), cfg, c, slo) for c in classes]
    caps: list[CapacityResult | None] = (
        list(max_rates(jobs, num_requests=SIM_REQUESTS)) if exact else [None] * len(jobs)
    )
    k = len(classes)
    out = []
    for i, ((_, hw, kv, _), (step, notes, margin, cfg)) in enumerate(
        zip(replicas, steps, strict=True)
    ):
        mine = caps[i * k : (i + 1) * k]
        got = tuple(c or rate_bound(*jobs[i * k + b]) for b, c in enumerate(mine))
        out.append(ReplicaPerf(hw, hw.count if hw.kind == "gpu" else 1, kv, got, step.source,
                               tuple(notes), all(c is not None for c in mine), margin, step,
                               cfg))  # fmt: skip
    return out


def perf_per_config(arch: ModelArch, spec: DeploymentSpec, catalog: Catalog,
                    classes: list[RequestClass], rows: list, need_len: int, *,
                    exact: bool = True) -> dict[ConfigKey, ReplicaPerf | None]:  # fmt: skip
    """Per configuration (GPU kind, TP), one replica's performance; a GPU kind no
    configuration of which fits maps to None at TP 0. With exact=False, upper bounds where
    the capacity searches have not run (`replica_perfs`)."""
    if spec.infra == "local":
        hw = cpu_hardware()
        model = cpu_roofline(arch, hw)
        kv = kv_capacity_tokens(model.arch, hw, kv_cache_gib=spec.engine.kv_cache_gib)
        fit = kv >= need_len
        return {("cpu", 1): replica_perf(model.arch, hw, kv, spec, classes, model) if fit else None}
    max_count: dict[str, int] = {}
    for o, _, _ in rows:
        max_count[o.gpu] = max(max_count.get(o.gpu, 0), o.gpu_count)
    fitting: list[tuple[ConfigKey, Hardware, int]] = []
    perf: dict[ConfigKey, ReplicaPerf | None] = {}
    for gpu, count in sorted(max_count.items()):
        fits = gpu_configs(arch, spec, catalog, gpu, count, need_len)
        if not fits:
            perf[gpu, 0] = None
        fitting += [((gpu, hw.count), hw, kv) for hw, kv in fits]
    done = replica_perfs([(arch, hw, kv, None) for _, hw, kv in fitting], spec, classes,
                         exact=exact)  # fmt: skip
    perf.update({key: rp for (key, _, _), rp in zip(fitting, done, strict=True)})
    return perf
