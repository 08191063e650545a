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
import asyncio
import hashlib
import http.client
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineArgs, ModelConfig
from engine.llm_engine import LLMEngine
from engine.metrics import read_step_log
from engine.model_runner import free_port
from engine.sampling_params import SamplingParams
from engine.sequence import SequenceStatus

SCHEMA = "skybroker-engine-profile/1"
# Idle requests per prompt length that time the server's per-request overhead, whatever
# --repeats: its median over 6 (--repeats 3) moved 2.6-6.5 ms between runs minutes apart on
# a 2-vCPU VM, a third of the tiny model's TTFT.
IDLE_REQUESTS = 10
MAX_LOOP_ROUNDS = 4
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
        """The grid within the engine's limits. Mixed points are clamped into them, not
        dropped: a profile without one cannot tell what a step that prefills beside running
        decodes costs (on CUDA, a prefill and a decode pass)."""
        ctxs = tuple(c for c in self.decode_contexts if c < max_len) or (max_len // 2,)
        mixed: list[tuple[int, int, int]] = []
        for b, c, p in self.mixed:
            b = min(b, max_batch)
            point = (b, min(c, ctxs[-1]), min(p, max_tokens - b, max_len - 1))
            if point[2] > 0 and point not in mixed:
                mixed.append(point)
        return Grid(
            tuple(p for p in self.prefill_tokens if p <= min(max_tokens, max_len - 1)),
            tuple(b for b in self.decode_batches if b <= max_batch),
            ctxs,
            tuple(mixed),
        )


# A GPU's grid: batches and token budgets as a serving replica on one runs them.
GPU_GRID = Grid(
    prefill_tokens=(128, 512, 1024, 2048, 4096, 8192),
    decode_batches=(1, 8, 32, 64, 128, 256),
    decode_contexts=(256, 1024, 2048),
    mixed=((32, 1024, 512), (128, 1024, 1024)),
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
        self.samples: dict[tuple[int, int, int], list[float]] = {}

    def _prompt(self, n: int) -> list[int]:
        # random ids: no prefix-cache hits between requests; below both vocabularies, since
        # the server takes only ids its tokenizer knows (random-weight models ship a small one)
        vocab = min(self.engine.model_config.vocab_size, self.engine.tokenizer.vocab_size)
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
        self.samples.setdefault((prefill, decode, round(context)), []).extend(times)

    def points(self) -> list[dict]:
        """One point per shape: the median of all its timed steps."""
        pts = []
        for (prefill, decode, context), times in self.samples.items():
            pts.append({"num_prefill_tokens": prefill, "num_decode_seqs": decode,
                        "total_context_tokens": context, "seconds": statistics.median(times)})  # fmt: skip
            print(f"  prefill {prefill:5d}  decode {decode:3d}  context {context:6d}  "
                  f"{pts[-1]['seconds'] * 1e3:8.2f} ms  (median of {len(times)})", file=sys.stderr)  # fmt: skip
        return pts

    def step_noise(self, num_quantiles: int = 21) -> list[float]:
        """Quantiles (0, 5, ..., 100 %) of each timed step over its shape's median, pooled over
        all shapes: how much one step varies around the profile's point (the simulator samples
        step times from it)."""
        ratios = [t / statistics.median(ts) for ts in self.samples.values() for t in ts]
        qs = np.quantile(ratios, np.linspace(0, 1, num_quantiles)) if ratios else [1.0]
        return [round(float(q), 4) for q in qs]

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
        rids = self._place_decoding(batch, context, self.repeats + 1)
        self._timed_step()  # not kept: the first step after placing a batch costs more
        times = [self._timed_step() for _ in range(self.repeats)]
        mid = context + 2 + (self.repeats - 1) / 2  # context after the middle timed step
        self._record(0, batch, batch * mid, times)
        self._abort(rids)

    def mixed(self, batch: int, context: int, tokens: int) -> None:
        rids = self._place_decoding(batch, context, 2 * self.repeats + 2)
        self._timed_step()  # not kept: the first step after placing a batch costs more
        times = []
        for _ in range(self.repeats):
            rid = self._add(tokens, 1)
            times.append(self._timed_step())
            self._abort([rid])
        mid = context + 2 + (self.repeats - 1) / 2
        self._record(tokens, batch, batch * mid + tokens, times)
        self._abort(rids)


def measure(engine: LLMEngine, grid: Grid, repeats: int) -> tuple[list[dict], list[float]]:
    """`repeats` rounds over the whole grid, one step per shape per round (so a change in the
    machine's load touches every shape alike), then the median per shape; and the spread of
    single steps around their shape's median (`Profiler.step_noise`)."""
    prof = Profiler(engine, 1)
    for _ in range(3):  # warm-up (allocator, caches, first-touch pages), not recorded
        prof.prefill(grid.prefill_tokens[-1])
        prof.decode(grid.decode_batches[-1], grid.decode_contexts[-1])
    prof.samples.clear()
    for _ in range(repeats):
        for p in grid.prefill_tokens:
            prof.prefill(p)
        for c in grid.decode_contexts:
            for b in grid.decode_batches:
                prof.decode(b, c)
        for b, c, p in grid.mixed:
            prof.mixed(b, c, p)
    return prof.points(), prof.step_noise()


# --- the server's own overhead ---------------------------------------------------------------


def _stream(port: int, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(TTFT, seconds from first to last chunk, tokens) of one streamed completion. Chunks
    can carry several tokens (held-back bytes, a slow reader), so tokens come from `usage`."""
    body = json.dumps({"model": "profile", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"server answered {resp.status}: {resp.read()[:200]!r}")
    first = last = 0.0
    n = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices"):  # a token (its text may be empty: half a character)
            last = time.perf_counter()
            first = first or last
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
    conn.close()
    return first - t0, last - first, n


class ServingProbe:
    """A real `engine.serve` process with the profiled engine's settings."""

    def __init__(self, args: argparse.Namespace, max_num_seqs: int,
                 step_log: str | None = None) -> None:  # fmt: skip
        self.port = free_port()
        cmd = [sys.executable, "-m", "engine.serve", "--model", args.model,
               "--port", str(self.port), "--served-model-name", "profile",
               "--max-num-seqs", str(max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--kv-cache-gib", str(args.kv_cache_gib), "--device", args.device,
               "--log-level", "warning"] + (["--step-log", step_log] if step_log else [])  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine.serve exited with {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError("engine.serve did not become healthy in 600 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def load(self, prompts: list[list[int]], max_tokens: list[int], gap_s: float = 0.0,
             concurrency: int | None = None) -> None:  # fmt: skip
        """Stream each prompt (the i-th sent i * gap_s after the first; with `concurrency`, at
        most that many at once, the next sent as one ends: a closed loop) with the lightest
        client there is: one asyncio loop that reads each response to its end without parsing
        it, so the load costs the machine about what remote clients would (a thread per stream
        parsing SSE would take CPU from the server it measures)."""
        slots = asyncio.Semaphore(concurrency or len(prompts))

        async def one(i: int) -> None:
            await asyncio.sleep(i * gap_s)
            async with slots:
                await stream(i)

        async def stream(i: int) -> None:
            body = json.dumps({"model": "profile", "prompt": prompts[i], "stream": True,
                               "max_tokens": max_tokens[i], "temperature": 0.0,
                               "ignore_eos": True}).encode()  # fmt: skip
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
            while await reader.read(1 << 16):
                pass
            writer.close()

        async def all_of() -> None:
            await asyncio.gather(*(one(i) for i in range(len(prompts))))

        asyncio.run(all_of())


def _engine_step(ref: Profiler, prefill: int, batch: int, context: int) -> float:
    """The bare engine's step of this shape timed now, in this process (median of ref.repeats
    steps): the reference a server timing taken just before is compared with, so a change in
    the machine's load between the grid and the server probe does not count as overhead."""
    ref.samples.clear()
    if batch and prefill:
        ref.mixed(batch, context, prefill)
    elif batch:
        ref.decode(batch, context)
    else:
        ref.prefill(prefill)
    return statistics.median(next(iter(ref.samples.values())))


def _busy_ttft_extra(probe: ServingProbe, prof: Profiler, ref: Profiler, grid: Grid,
                     repeats: int, settle_s: float) -> list[float]:  # fmt: skip
    """TTFT of short requests sent while other streams decode, minus what the engine alone
    takes: the rest of the step in flight (half a decode step on average) and the mixed step
    that prefills the request beside the decodes (both timed on the bare engine right after)."""
    b = min(4, max(grid.decode_batches))
    ctx, p = grid.decode_contexts[0], grid.prefill_tokens[0]
    longest = max(8 * repeats, 32)
    bg = threading.Thread(
        target=probe.load, args=([prof._prompt(ctx) for _ in range(b)], [longest] * b)
    )
    bg.start()
    time.sleep(0.5)  # the background streams are decoding
    ttfts = []
    while bg.is_alive() and len(ttfts) < repeats:
        ttfts.append(_stream(probe.port, prof._prompt(p), 2)[0])
        time.sleep(settle_s)  # let the background batch settle between probes
    bg.join()
    mid = ctx + longest // 2
    engine = _engine_step(ref, 0, b, mid) / 2 + _engine_step(ref, p, b, mid)
    return [t - engine for t in ttfts] or [0.0]


def loop_requests(points: list[dict], streams: int, budget_s: float, mean_tokens: int = 32,
                  min_steps: int = 24, max_steps: int = 128) -> int:  # fmt: skip
    """Requests for a closed loop of `streams` streams: enough for about `budget_s` of decode
    steps at that batch (the grid's fastest point of that batch size, or the nearest larger
    one), within [min_steps, max_steps] steps; each request decodes ~mean_tokens tokens."""
    decode = [q for q in points if not q["num_prefill_tokens"] and q["num_decode_seqs"]]
    at = [q for q in decode if q["num_decode_seqs"] >= streams] or decode
    batch = min(q["num_decode_seqs"] for q in at)
    step_s = min(q["seconds"] for q in at if q["num_decode_seqs"] == batch)
    steps = min(max(int(budget_s / max(step_s, 1e-6)), min_steps), max_steps)
    return streams + math.ceil(steps * streams / mean_tokens)


def another_round(elapsed_s: float, rounds: int, budget_s: float) -> bool:
    """Whether the serving probe runs its closed loops once more: up to MAX_LOOP_ROUNDS rounds
    while another fits in the budget. A fast model's loops hit their step cap in seconds; the
    rounds spread its served steps over the budget, so a machine whose speed moves from one
    minute to the next is not sampled in one short patch (on a 2-vCPU VM the served decode
    factor of one probe of 3 s of steps came out 0.74-1.12 in runs minutes apart)."""
    return rounds < MAX_LOOP_ROUNDS and elapsed_s * (rounds + 1) / rounds <= budget_s


def loop_overhead(steps: list[dict]) -> tuple[float, float]:
    """(per step, per sequence) seconds the serving engine's loop spends between two
    back-to-back decode steps of the same batch (sending the step's tokens to the HTTP process,
    taking in commands): least squares over the median gap per batch size, clipped at 0."""
    gaps: dict[int, list[float]] = {}
    for a, b in pairwise(steps):
        n = a["num_decode_seqs"]
        if a["num_prefill_tokens"] == b["num_prefill_tokens"] == 0 and b["num_decode_seqs"] == n:
            gaps.setdefault(n, []).append(max(b["start"] - a["start"] - a["duration_s"], 0.0))
    med = [(n, statistics.median(g)) for n, g in sorted(gaps.items()) if len(g) >= 5]
    if not med:
        return 0.0, 0.0
    if len(med) == 1:
        return med[0][1], 0.0
    ns, gs = np.array([n for n, _ in med], float), np.array([g for _, g in med])
    slope = max(float(np.polyfit(ns, gs, 1)[0]), 0.0)
    return max(float(np.mean(gs - slope * ns)), 0.0), slope


def served_rows(steps: list[dict]) -> list[list[float | None]]:
    """Step-log lines as a profile's `serving_steps` rows: [prefill tokens, decode seqs,
    context tokens, prefill attention pairs, seconds, gap]. The gap is the loop's time from the
    step's end to the next step's start when the next step decodes (a sequence went on, so the
    loop did not wait for work), else None (the engine went idle)."""
    rows: list[list[float | None]] = []
    for s, nxt in zip(steps, [*steps[1:], None], strict=True):
        gap = None
        if nxt is not None and nxt["num_decode_seqs"] > 0:
            gap = round(max(nxt["start"] - s["start"] - s["duration_s"], 0.0), 7)
        rows.append([s["num_prefill_tokens"], s["num_decode_seqs"], s["num_context_tokens"],
                     round(s.get("prefill_attn_pairs", 0.0), 1), round(s["duration_s"], 7), gap])  # fmt: skip
    return rows


def measure_serving(prof: Profiler, points: list[dict], args: argparse.Namespace,
                    grid: Grid) -> tuple[dict, list[list[float]]]:  # fmt: skip
    """The server's overhead over bare engine steps (see the module docstring), and the steps
    the served engine ran under a streaming load (from its step log). Each TTFT is paired with
    the same shape's engine step timed right after it in this process (`_engine_step`), not
    with the grid's points measured minutes before."""
    ref = Profiler(prof.engine, max(3, args.repeats // 2), seed=2)
    max_seqs = max(max(grid.decode_batches), 2)
    log = Path(tempfile.mkdtemp(prefix="profile-steps-")) / "steps.jsonl"
    probe = ServingProbe(args, max_seqs, step_log=str(log))
    try:
        _stream(probe.port, prof._prompt(8), 4)  # warm-up
        _, offset = read_step_log(log)
        warm_end = offset
        ttft_extra = []
        for p in grid.prefill_tokens[:2]:
            for _ in range(max(args.repeats, IDLE_REQUESTS)):
                ttft, _, _ = _stream(probe.port, prof._prompt(p), 2)
                new, offset = read_step_log(log, offset)
                # the served engine's own prefill step (the step log), not a bare one: what it
                # costs the engine while serving is the step-time factors' part
                ttft_extra.append(ttft - sum(s["duration_s"] for s in new
                                             if s["num_prefill_tokens"]))  # fmt: skip
        # settle for ~3 decode steps between probes
        step_s = statistics.median(q["seconds"] for q in points if not q["num_prefill_tokens"])
        busy_extra = _busy_ttft_extra(probe, prof, ref, grid, args.repeats, 3 * step_s)
        # closed loops of 1, 2, 4 ... max_seqs streams: steady batches of each size, a new
        # request's prefill joining the batch whenever one ends, as under a steady load
        lens = grid.prefill_tokens[:3]
        loops = sorted({*grid.decode_batches, max_seqs})
        started, rounds = time.monotonic(), 0
        while rounds == 0 or another_round(time.monotonic() - started, rounds,
                                           args.serving_seconds):  # fmt: skip
            for c in loops:
                n = loop_requests(points, c, args.serving_seconds / len(loops))
                probe.load([prof._prompt(lens[i % len(lens)]) for i in range(n)],
                           [16 + 8 * (i % 5) for i in range(n)], concurrency=c)  # fmt: skip
            rounds += 1
        steps, _ = read_step_log(log, warm_end)
    finally:
        probe.close()
        shutil.rmtree(log.parent, ignore_errors=True)
    icpt, slope = loop_overhead(steps)
    serving = {"request_overhead_s": max(statistics.median(ttft_extra), 0.0),
               "busy_request_overhead_s": max(statistics.median(busy_extra), 0.0),
               "step_overhead_s": icpt, "per_seq_overhead_s": slope,
               "note": f"TTFT - the served prefill step over {len(ttft_extra)} idle requests "
                       f"(the server's step log); TTFT - (half a decode step + "
                       f"the mixed step) over {len(busy_extra)} requests beside running streams; "
                       f"step and per-sequence overhead: the engine loop's gaps between "
                       f"back-to-back decode steps over {len(steps)} served steps"}  # fmt: skip
    served = served_rows(steps)
    print(f"  serving overhead: request {serving['request_overhead_s'] * 1e3:.1f} ms idle, "
          f"{serving['busy_request_overhead_s'] * 1e3:.1f} ms busy, engine loop "
          f"{icpt * 1e3:.3f} ms + {slope * 1e3:.3f} ms/seq per step; {len(served)} served "
          f"steps", file=sys.stderr)  # fmt: skip
    return serving, served


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
