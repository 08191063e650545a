"""Engine counters: KV cache use, waste, prefix-cache hit rate, preemptions, batch shapes."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TextIO


@dataclass
class StepStats:
    """Shape and duration of one engine step."""

    num_decode_seqs: int
    num_prefill_seqs: int
    num_prefill_tokens: int
    num_context_tokens: int  # sum of context lengths attended over (decode + prefill)
    duration_s: float
    prefill_attn_pairs: float = 0.0  # prefill (query, key) pairs: chunk x (cached + chunk / 2)


@dataclass
class EngineMetrics:
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_waste: float  # share of allocated KV slots holding no token
    prefix_cache_hit_rate: float  # hit tokens / looked-up tokens at admission
    num_preemptions: int
    num_waiting: int
    num_running: int
    num_steps: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    recent_steps: list[StepStats] = field(default_factory=list)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class Counters:
    """Totals the engine updates as it runs (the mutable part behind EngineMetrics)."""

    num_steps: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    recent_steps: deque[StepStats] = field(default_factory=lambda: deque(maxlen=1024))


class StepLog:
    """One JSON line per step: `start` (time.monotonic(), comparable across processes on one
    machine) and the StepStats fields. Line-buffered, so a reader sees whole steps."""

    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 (closed by close())

    def write(self, st: StepStats) -> None:
        self._file.write(
            json.dumps({"start": time.monotonic() - st.duration_s, **asdict(st)}) + "\n"
        )

    def close(self) -> None:
        self._file.close()


def read_step_log(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """The step log's lines from byte `offset` on, and the new end offset (to read on from)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    return [json.loads(line) for line in data.splitlines() if line.strip()], offset + len(data)
