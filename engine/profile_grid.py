"""The step-time grid `python -m engine.profile` measures: which batch shapes (`Grid`) and
the `Profiler` that drives one engine through them and times its real `LLMEngine.step()`s."""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import SequenceStatus


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
