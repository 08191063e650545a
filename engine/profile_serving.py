"""The server's own overhead for `python -m engine.profile`: a real `python -m engine.serve`
with a step log, timed from outside (idle and busy TTFT over the engine's own steps, closed
streaming loops whose step log gives the engine loop's gaps and the served steps)."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

import numpy as np

from engine.metrics import read_step_log
from engine.model_runner import free_port
from engine.profile_grid import Grid, Profiler

# Idle requests per prompt length that time the server's per-request overhead, whatever
# --repeats: its median over 6 (--repeats 3) moved 2.6-6.5 ms between runs minutes apart on
# a 2-vCPU VM, a third of the tiny model's TTFT.
IDLE_REQUESTS = 10
MAX_LOOP_ROUNDS = 4


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
