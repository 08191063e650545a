"""Engine throughput with structured output on vs off, for the same requests.

`--requests` requests (default 96) run through `LLM.generate` at `--batch` running sequences
(default 32: continuous batching keeps the batch full while requests wait) on the tests' tiny
random Llama (2 layers x 64 wide: a step takes a few milliseconds, so whatever the grammar
work adds shows): once with a JSON schema on each request (`SamplingParams.structured_outputs`),
once without, with `max_tokens` set to the lengths the constrained run produced and `ignore_eos`,
so both runs generate the same tokens per request. Each round runs both, in alternating order;
the lines are the median output tok/s of each, and the medians over rounds of the round's
on/off ratio, by wall time and by this process's CPU time (which load from other processes
on a shared machine does not inflate). Grammar compilation happens before the
timed runs (the LRU keeps it): what is measured is the per-step mask and matcher work.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/structured_output.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams
from engine.structured_output import StructuredOutputsParams
from tests.fixtures_models import build_tiny_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["paris", "london", "rome"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 4},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "tags", "admin"],
}


def timed(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[float, float, list]:
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, time.process_time() - c0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--model", default=None, help="a model dir (default: the tests' tiny Llama)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = args.model or str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama"))
    llm = LLM(model, max_model_len=512, num_kv_blocks=64 * args.batch // 4 + 64,
              block_size=16, max_num_seqs=args.batch)  # fmt: skip
    prompts = [f"the cat {i} sat on the river and the dog" for i in range(args.requests)]
    so = StructuredOutputsParams(json=SCHEMA)
    on = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens,
                         structured_outputs=so) for i in range(args.requests)]  # fmt: skip
    _, _, outs = timed(llm, prompts, on)  # compiles the grammar (cached from here on)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    valid = 0
    for o in outs:
        try:
            json.loads(o.outputs[0].text)
            valid += 1
        except ValueError:
            pass
    off = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
           for i, n in enumerate(lengths)]  # fmt: skip
    timed(llm, prompts, off)  # warm-up
    tokens = sum(lengths)
    rates: dict[str, list[float]] = {"on": [], "off": []}
    wall_ratios, cpu_ratios = [], []
    for r in range(args.rounds):
        order = (("on", on), ("off", off)) if r % 2 == 0 else (("off", off), ("on", on))
        wall, cpu = {}, {}
        for name, params in order:
            wall[name], cpu[name], got = timed(llm, prompts, params)
            assert sum(len(o.outputs[0].token_ids) for o in got) == tokens, name
            rates[name].append(tokens / wall[name])
        wall_ratios.append(wall["off"] / wall["on"])
        cpu_ratios.append(cpu["off"] / cpu["on"])
    med_on, med_off = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(f"{args.requests} requests at batch {args.batch}, {tokens} output tokens per run ({min(lengths)}-{max(lengths)} "
          f"per request), {valid}/{len(outs)} outputs parse as JSON, {args.rounds} rounds")  # fmt: skip
    print(f"structured output off: {med_off:.0f} tok/s (median)")
    print(f"structured output on:  {med_on:.0f} tok/s (median)")
    for what, ratios in (("wall", wall_ratios), ("CPU", cpu_ratios)):
        ratio = statistics.median(ratios)
        print(f"on / off throughput, median of the rounds' ratios by {what} time: {ratio:.3f} "
              f"({(1 - ratio) * 100:+.1f}% slower; rounds {min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
