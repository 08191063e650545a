"""How steady is this machine? The same engine step, timed over and over, per time window.

A performance model predicts a machine whose speed holds still. This times one fixed decode
step (the tiny random Llama of benchmarks/validate_perf.py, `--batch` sequences at `--context`
tokens, placed straight into the KV cache as the profiler does) back to back for `--seconds`
and prints the median step time of each `--window`-second window, then the spread of those
medians (max / min). On a quiet dedicated machine the windows agree within a few percent; on a
shared VM they need not, and no profile measured minutes before can predict it.

    OMP_NUM_THREADS=1 python benchmarks/machine_drift.py [--seconds 90] [--window 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from validate_perf import tiny_model  # noqa: E402

from engine.config import EngineArgs  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.profile_grid import Profiler  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--window", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(1)
    engine = LLMEngine.from_args(EngineArgs(model=tiny_model(), device="cpu", kv_cache_gib=0.25,
                                            max_num_seqs=max(a.batch, 2)))  # fmt: skip
    prof = Profiler(engine, 1)
    for _ in range(3):  # warm-up
        prof.decode(a.batch, a.context)
    medians = []
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        times: list[float] = []
        w_end = time.monotonic() + a.window
        while time.monotonic() < w_end:
            rids = prof._place_decoding(a.batch, a.context, 60)
            times += [prof._timed_step() for _ in range(50)]
            prof._abort(rids)
        medians.append(statistics.median(times))
        print(f"window {len(medians):3d}: median step {medians[-1] * 1e3:7.2f} ms "
              f"({len(times)} steps)", flush=True)  # fmt: skip
    print(f"decode batch {a.batch} at {a.context} tokens, {a.window:g}-s windows: median "
          f"{statistics.median(medians) * 1e3:.2f} ms, min {min(medians) * 1e3:.2f}, max "
          f"{max(medians) * 1e3:.2f}, max/min {max(medians) / min(medians):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
