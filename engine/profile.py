"""Measure the engine's step time on this hardware and write a profile for the planner.

    python -m engine.profile --model PATH --out FILE [--max-batch 16] [--repeats 5]

Runs real `LLMEngine.step()` calls (scheduler, model forward, sampling, detokenization: what
a serving replica pays per step) over a grid of batch shapes:
- prefill steps of P prompt tokens (one request, `max_tokens=1`);
- decode steps of B sequences at C tokens of context each (the sequences are placed in the
  KV cache directly at C tokens, so no prefill has to run first: step time does not depend on
  the cache's contents);
- mixed steps: B decoding sequences plus one prefill chunk of P tokens.
A placed batch's first step is not timed (it costs more than the steady steps a serving batch
runs). Each point is the median of `--repeats` steps; `step_noise` keeps the spread of single steps
around their shape's median (quantiles, pooled over the grid), which the simulator samples.
Then (unless --no-serving) it starts a real `python -m engine.serve` with the same settings
and a step log, and serves streamed /v1/completions requests from it: an idle request's TTFT
minus its own served prefill step (the step log) is the per-request server overhead; a
request's TTFT beside running streams, minus half a decode step and the mixed step (both timed
on the bare engine right after it), is the busy one. Closed-loop streaming loads follow
(1, 2, 4 ... max-batch streams, each sending its next request when one ends; in up to 4
rounds while --serving-seconds lasts); from
the step log come the engine loop's gaps between back-to-back decode steps (the per-step and
per-sequence overhead of serving) and the steps the served engine ran (`serving_steps`: each
step's shape, seconds and the loop's gap after it; the simulator takes its step-time factors
from their ratio to the grid's fit, which carries what serving costs the engine beyond the
grid, per kind of step and in the order the steps ran). `--serving-only` re-times just the `serving` section
of an existing profile (and drops its `serving_steps`, which mean something only beside a grid
measured with them). The JSON follows the planner's measured profile format
("skybroker-engine-profile/1", see skybroker/perf/profile.py), written here
without importing skybroker (the engine never does), tagged with the hardware (GPU kind and
count on CUDA; CPU model, core count and torch threads on CPU) and the model's identity
(name, arch_hash computed as skybroker.models.ModelArch.arch_hash, dtype).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from engine.config import EngineArgs, ModelConfig
from engine.llm_engine import LLMEngine
from engine.profile_grid import GPU_GRID, Grid, Profiler, measure
from engine.profile_serving import measure_serving

SCHEMA = "skybroker-engine-profile/1"
# The planner's GPU kinds (catalogs/gpus.csv names).
GPU_KINDS = ("A100-80GB", "V100-32GB", "GH200", "B200", "H200", "H100", "A100", "A10G", "A10",
             "A6000", "A40", "L40S", "L40", "L4", "RTX6000", "T4", "V100")  # fmt: skip


# --- identity -------------------------------------------------------------------------------


def gpu_kind(device_name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `H100`; `NVIDIA A100-SXM4-80GB` -> `A100-80GB`."""
    name = device_name.upper().replace("NVIDIA", "").replace("TESLA", "").strip()
    if "A100" in name and "80GB" in name:
        return "A100-80GB"
    if "V100" in name and "32GB" in name:
        return "V100-32GB"
    if "RTX 6000" in name:
        return "RTX6000"
    words = re.split(r"[\s-]+", name)
    return next((k for k in GPU_KINDS if k in words), device_name.strip())


def cpu_model_name() -> str:
    """The same string skybroker.perf.roofline.cpu_model_name reads (planner's match key)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_tag(device: torch.device, tensor_parallel: int) -> dict:
    if device.type == "cuda":
        return {"kind": "gpu", "name": gpu_kind(torch.cuda.get_device_name(0)),
                "count": tensor_parallel, "device_name": torch.cuda.get_device_name(0)}  # fmt: skip
    return {"kind": "cpu", "name": cpu_model_name(), "count": os.cpu_count() or 1,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def arch_hash(cfg: ModelConfig, dtype: str) -> str:
    """skybroker.models.ModelArch.arch_hash of this model at `dtype` (same fields, same JSON)."""
    fields = {
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "dtype": dtype,
        "weight_bytes_override": None,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def model_tag(engine: LLMEngine) -> dict:
    dtype = str(engine.runner.dtype).removeprefix("torch.")
    name = Path(engine.args.model).name.removesuffix(".gguf")
    return {"name": name, "arch_hash": arch_hash(engine.model_config, dtype), "dtype": dtype}


def profile_dict(engine: LLMEngine, points: list[dict], wall_s: float,
                 serving: dict | None = None, step_noise: list[float] | None = None,
                 serving_steps: list[list[float]] | None = None) -> dict:  # fmt: skip
    a = engine.args
    d = {
        "schema": SCHEMA,
        "hardware": hardware_tag(engine.runner.device, a.tensor_parallel_size),
        "model": model_tag(engine),
        "engine": {
            "block_size": a.block_size,
            "max_num_seqs": a.max_num_seqs,
            "max_num_batched_tokens": a.max_num_batched_tokens,
            "num_kv_blocks": engine.runner.num_blocks,
            "max_model_len": engine.max_model_len,
        },
        "points": points,
        **({"step_noise": step_noise} if step_noise else {}),
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": (
            f"python -m engine.profile (LLMEngine.step medians; torch "
            f"{torch.__version__}, {wall_s:.0f} s, load average "
            f"{os.getloadavg()[0]:.1f})"
        ),
    }
    if serving:
        d["serving"] = serving
    if serving_steps:
        d["serving_steps"] = serving_steps
    return d


_NUMBER = r"(?:-?[0-9][0-9.eE+-]*|null)"
_NUMBERS = re.compile(rf"\[\s+({_NUMBER}(?:,\s+{_NUMBER})*)\s+\]")


def profile_json(data: dict) -> str:
    """The profile as indented JSON with each list of numbers on one line (a served step is a
    line, not eight)."""
    text = json.dumps(data, indent=1)
    return _NUMBERS.sub(lambda m: "[" + re.sub(r",\s+", ", ", m[1]) + "]", text) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m engine.profile", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", required=True, help="HF model directory or .gguf file")
    ap.add_argument("--out", required=True, help="profile JSON to write")
    ap.add_argument("--grid", default="auto", choices=("auto", "cpu", "gpu"),
                    help="batch-shape grid (auto: gpu on CUDA, else cpu)")  # fmt: skip
    ap.add_argument("--max-batch", type=int, default=None,
                    help="largest decode batch (default: 16 on the cpu grid, 256 on gpu)")  # fmt: skip
    ap.add_argument("--max-context", type=int, default=None,
                    help="largest decode context (default: 1024 cpu, 2048 gpu)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5, help="steps per point; the median is kept")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="prefill token budget per step (default: 2048 cpu, 8192 gpu)")  # fmt: skip
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache size")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="share of the GPU the profiled engine takes (default 0.9; 0.45 when the "
                    "serving probe, a second engine, shares the GPU)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    ap.add_argument("--no-serving", action="store_true",
                    help="skip timing a real engine.serve (the server's own overhead)")  # fmt: skip
    ap.add_argument("--serving-seconds", type=float, default=60.0,
                    help="about how long the serving probe's closed loops step in all (each "
                    "loop runs 24-128 steps within its share; the loops run again, up to 4 "
                    "rounds, while the budget lasts)")  # fmt: skip
    ap.add_argument("--serving-only", action="store_true",
                    help="keep --out's measured steps and re-measure only its serving section")  # fmt: skip
    args = ap.parse_args(argv)
    if args.serving_only and (args.no_serving or not Path(args.out).is_file()):
        ap.error("--serving-only needs an existing --out profile (and not --no-serving)")
    if args.grid == "auto":
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.grid = "gpu" if cuda else "cpu"
    gpu = args.grid == "gpu"
    for name, cpu_default, gpu_default in (
        ("max_batch", 16, 256),
        ("max_context", 1024, 2048),
        ("max_num_batched_tokens", 2048, 8192),
    ):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.9 if args.no_serving else 0.45
    for name in ("max_batch", "max_context", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        engine = LLMEngine.from_args(EngineArgs(
            model=args.model, device=args.device, dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size, kv_cache_gib=args.kv_cache_gib,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=max(args.max_batch + 1, 2),
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False))  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = GPU_GRID if args.grid == "gpu" else Grid()
    ctxs = tuple(c for c in base.decode_contexts if c <= args.max_context) or (args.max_context,)
    grid = Grid(base.prefill_tokens, base.decode_batches, ctxs, base.mixed)
    max_len = engine.max_model_len - args.repeats * 2 - 2
    grid = grid.limited(args.max_batch, args.max_num_batched_tokens, max_len)
    hw = hardware_tag(engine.runner.device, args.tensor_parallel_size)
    print(f"profiling {args.model} on {hw['kind']} {hw['name']} x{hw['count']}", file=sys.stderr)
    out = Path(args.out)
    if args.serving_only:  # keep the file's steps, re-time the server against them
        data = json.loads(out.read_text())
        points = data["points"]
        data["serving"], _ = measure_serving(
            Profiler(engine, args.repeats, seed=1), points, args, grid
        )
        # served steps are factors over the grid's fit: only with a grid measured beside them
        # (this machine's speed moves between runs), so a re-timed section drops them
        data.pop("serving_steps", None)
        data["source"] += (f"; serving re-measured {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} "
                           f"(load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    else:
        points, noise = measure(engine, grid, args.repeats)
        serving, served = None, None
        if not args.no_serving:
            serving, served = measure_serving(
                Profiler(engine, args.repeats, seed=1), points, args, grid
            )
        data = profile_dict(engine, points, time.perf_counter() - t0, serving, noise, served)
    engine.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_json(data))
    print(f"wrote {out} ({len(points)} points, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
