"""Measure the engine's step time on this hardware and write a profile for the planner.

    python -m engine.profile --model PATH --out FILE [--max-batch 16] [--repeats 5]

Runs real `LLMEngine.step()` calls (scheduler, model forward, sampling, detokenization: what
a serving replica pays per step) over a grid of batch shapes:
- prefill steps of P prompt tokens (one request, `max_tokens=1`);
- decode steps of B sequences at C tokens of context each (the sequences are placed in the
  KV cache directly at C tokens, so no prefill has to run first: step time does not depend on
  the cache's contents);
- mixed steps: B decoding sequences plus one prefill chunk of P tokens.
Each point is the median of `--repeats` steps. The JSON follows the planner's measured
profile format ("skybroker-engine-profile/1", see skybroker/perf/profile.py), written here
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
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from engine.config import EngineArgs, ModelConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import SequenceStatus

SCHEMA = "skybroker-engine-profile/1"
# The planner's GPU kinds (catalogs/gpus.csv names).
GPU_KINDS = ("A100-80GB", "V100-32GB", "GH200", "B200", "H200", "H100", "A100", "A10G", "A10",
             "A6000", "A40", "L40S", "L40", "L4", "RTX6000", "T4", "V100")  # fmt: skip


@dataclass(frozen=True)
class Grid:
    prefill_tokens: tuple[int, ...] = (16, 64, 128, 256, 512)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    mixed: tuple[tuple[int, int, int], ...] = ((4, 256, 64), (8, 256, 128))  # (B, C, P)

    def limited(self, max_batch: int, max_tokens: int, max_len: int) -> Grid:
        ctxs = tuple(c for c in self.decode_contexts if c < max_len) or (max_len // 2,)
        return Grid(
            tuple(p for p in self.prefill_tokens if p <= min(max_tokens, max_len - 1)),
            tuple(b for b in self.decode_batches if b <= max_batch),
            ctxs,
            tuple(
                m
                for m in self.mixed
                if m[0] <= max_batch and m[2] + m[0] <= max_tokens and m[1] < max_len
            ),
        )


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


# --- measuring ------------------------------------------------------------------------------


class Profiler:
    """Drives one engine through controlled steps and times them."""

    def __init__(self, engine: LLMEngine, repeats: int, seed: int = 0) -> None:
        self.engine, self.repeats = engine, repeats
        self.gen = torch.Generator().manual_seed(seed)
        self.points: list[dict] = []

    def _prompt(self, n: int) -> list[int]:
        # random ids: no prefix-cache hits between requests
        vocab = self.engine.model_config.vocab_size
        return torch.randint(0, vocab, (n,), generator=self.gen).tolist()

    def _add(self, n: int, max_tokens: int) -> str:
        rid = uuid.uuid4().hex
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.engine.add_request(rid, self._prompt(n), params)
        return rid

    def _place_decoding(self, batch: int, context: int, steps: int) -> list[str]:
        """`batch` running sequences whose first `context` tokens are already in the cache."""
        e = self.engine
        rids = [self._add(context + 1, steps + 2) for _ in range(batch)]
        sched, bm = e.scheduler, e.block_manager
        while sched.waiting:
            seq = sched.waiting.popleft()
            bm.allocate_slots(seq, context)
            seq.num_computed_tokens = context
            seq.status = SequenceStatus.RUNNING
            sched.running.append(seq)
        return rids

    def _timed_step(self) -> float:
        t0 = time.perf_counter()
        self.engine.step()
        if self.engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _record(self, prefill: int, decode: int, context: float, times: list[float]) -> None:
        self.points.append({"num_prefill_tokens": prefill, "num_decode_seqs": decode,
                            "total_context_tokens": round(context),
                            "seconds": statistics.median(times)})  # fmt: skip
        print(f"  prefill {prefill:5d}  decode {decode:3d}  context {round(context):6d}  "
              f"{statistics.median(times) * 1e3:8.2f} ms", file=sys.stderr)  # fmt: skip

    def _abort(self, rids: list[str]) -> None:
        for rid in rids:
            self.engine.abort_request(rid)

    def prefill(self, tokens: int) -> None:
        times = []
        for _ in range(self.repeats):
            rid = self._add(tokens, 1)
            times.append(self._timed_step())
            self._abort([rid])
        self._record(tokens, 0, tokens, times)

    def decode(self, batch: int, context: int) -> None:
        rids = self._place_decoding(batch, context, self.repeats)
        times = [self._timed_step() for _ in range(self.repeats)]
        mid = context + 1 + (self.repeats - 1) / 2  # context after the middle step
        self._record(0, batch, batch * mid, times)
        self._abort(rids)

    def mixed(self, batch: int, context: int, tokens: int) -> None:
        rids = self._place_decoding(batch, context, 2 * self.repeats)
        times = []
        for _ in range(self.repeats):
            rid = self._add(tokens, 1)
            times.append(self._timed_step())
            self._abort([rid])
        mid = context + 1 + (self.repeats - 1) / 2
        self._record(tokens, batch, batch * mid + tokens, times)
        self._abort(rids)


def measure(engine: LLMEngine, grid: Grid, repeats: int) -> list[dict]:
    prof = Profiler(engine, repeats)
    for _ in range(3):  # warm-up (allocator, caches, first-touch pages), not recorded
        prof.prefill(grid.prefill_tokens[-1])
        prof.decode(grid.decode_batches[-1], grid.decode_contexts[-1])
    prof.points.clear()
    for p in grid.prefill_tokens:
        prof.prefill(p)
    for c in grid.decode_contexts:
        for b in grid.decode_batches:
            prof.decode(b, c)
    for b, c, p in grid.mixed:
        prof.mixed(b, c, p)
    return prof.points


def profile_dict(engine: LLMEngine, points: list[dict], wall_s: float) -> dict:
    a = engine.args
    return {
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
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": (
            f"python -m engine.profile (LLMEngine.step medians; torch "
            f"{torch.__version__}, {wall_s:.0f} s, load average "
            f"{os.getloadavg()[0]:.1f})"
        ),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m engine.profile", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", required=True, help="HF model directory or .gguf file")
    ap.add_argument("--out", required=True, help="profile JSON to write")
    ap.add_argument("--max-batch", type=int, default=16, help="largest decode batch (default 16)")
    ap.add_argument("--max-context", type=int, default=1024, help="largest decode context")
    ap.add_argument("--repeats", type=int, default=5, help="steps per point; the median is kept")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    args = ap.parse_args(argv)
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
            max_num_seqs=max(args.max_batch + 1, 2),
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False))  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid = Grid(decode_contexts=tuple(c for c in Grid.decode_contexts if c <= args.max_context)
                or (args.max_context,))  # fmt: skip
    max_len = engine.max_model_len - args.repeats * 2 - 2
    grid = grid.limited(args.max_batch, args.max_num_batched_tokens, max_len)
    hw = hardware_tag(engine.runner.device, args.tensor_parallel_size)
    print(f"profiling {args.model} on {hw['kind']} {hw['name']} x{hw['count']}", file=sys.stderr)
    points = measure(engine, grid, args.repeats)
    data = profile_dict(engine, points, time.perf_counter() - t0)
    engine.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out} ({len(points)} points, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
