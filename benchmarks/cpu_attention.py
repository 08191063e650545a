"""The C++ CPU attention kernel on a decode step of every layer, against another tree's kernel.

    PYTHONPATH=. python benchmarks/cpu_attention.py [--baseline-tree OLD] [--rounds 3]

One decode step of `--batch` sequences over `--layers` layers of the 32-layer benchmark model's
attention shape (4 query heads of 16, 2 KV heads, fp32, blocks of 16), with nothing written
(slot -1): the time of `torch.ops.skybroker.paged_attention` over all layers, per context
length and block layout. `sequential`: each sequence's blocks in a row (a fresh cache);
`shuffled`: blocks drawn at random from the cache (a cache after hours of serving). `hot`: one
layer's cache called for every layer, so its data stays in cache: the kernel's arithmetic
alone. Then one sequence's prefill of `--prefill` tokens over all layers. Each tree's kernel is built into its own cache directory and timed in its own process
(one torch thread), trees interleaved per round; median ms over rounds. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("sequential", "shuffled", "hot")


def worker(a: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    from kernels import cpu_attention
    from kernels.attention_op import StepContext

    cpu_attention.load(a.cache)
    heads, kv_heads, dim, bs, blocks = 4, 2, 16, 16, 4096
    torch.manual_seed(0)
    caches = [
        (torch.randn(blocks, bs, kv_heads, dim), torch.randn(blocks, bs, kv_heads, dim))
        for _ in range(a.layers)
    ]
    q = torch.randn(a.batch, heads, dim)
    k, v = torch.randn(2, a.batch, kv_heads, dim)
    out = {}
    for ctx_len in a.contexts:
        per = -(-ctx_len // bs)
        order = {
            "sequential": torch.arange(a.batch * per),
            "shuffled": torch.randperm(blocks, generator=torch.Generator().manual_seed(1)),
        }
        for layout in LAYOUTS:
            tables = order["sequential" if layout == "hot" else layout][: a.batch * per]
            ctx = StepContext(
                num_tokens=a.batch,
                num_decode_tokens=a.batch,
                slot_mapping=torch.full((a.batch,), -1, dtype=torch.int64),
                decode_block_tables=tables.view(a.batch, per).int(),
                decode_context_lens=torch.full((a.batch,), ctx_len, dtype=torch.int32),
                prefill_block_tables=torch.zeros(0, per, dtype=torch.int32),
                prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                prefill_context_lens=torch.zeros(0, dtype=torch.int32),
                kv_caches=caches,
            )
            layers = [0] * a.layers if layout == "hot" else list(range(a.layers))
            out[f"{ctx_len}/{layout}"] = attention_ms(ctx, layers, q, k, v, a.reps)
    n, per = a.prefill, -(-a.prefill // bs)
    ctx = StepContext(
        num_tokens=n,
        num_decode_tokens=0,
        slot_mapping=torch.full((n,), -1, dtype=torch.int64),
        decode_block_tables=torch.zeros(0, per, dtype=torch.int32),
        decode_context_lens=torch.zeros(0, dtype=torch.int32),
        prefill_block_tables=torch.randperm(blocks)[:per].view(1, per).int(),
        prefill_cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        prefill_context_lens=torch.tensor([n], dtype=torch.int32),
        kv_caches=caches,
    )
    q, k, v = torch.randn(n, heads, dim), *torch.randn(2, n, kv_heads, dim)
    out["prefill"] = attention_ms(ctx, list(range(a.layers)), q, k, v, max(3, a.reps // 4))
    return out


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median ms of `reps` calls of `fn`, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def attention_ms(ctx, layers: list[int], q, k, v, reps: int, scale: float = 0.25) -> float:
    """Median ms of one step's `paged_attention` calls over `layers` (in `ctx`)."""
    import torch

    from kernels import attention_op

    op = torch.ops.skybroker.paged_attention

    def step() -> None:
        with attention_op.step_context(ctx):
            for layer in layers:
                op(q, k, v, layer, scale, None)

    return median_ms(step, reps)


def run_one(tree: Path, cache: str, a: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--cache", cache, "--batch", str(a.batch),
           "--layers", str(a.layers), "--reps", str(a.reps), "--prefill", str(a.prefill),
           "--contexts", *map(str, a.contexts)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker for {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="another source tree (e.g. `git archive` of main) whose kernel is timed too")  # fmt: skip
    p.add_argument("--contexts", nargs="+", type=int, default=[50, 200, 1000])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512, help="tokens of the one prefill timed")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    trees = {"this": ROOT}
    if a.baseline_tree is not None:
        trees = {"baseline": a.baseline_tree.resolve(), **trees}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, tree in trees.items():
                runs[name].append(run_one(tree, os.path.join(tmp, name), a))
                print(f"round {r + 1} {name}", file=sys.stderr)
    print(f"{a.batch} sequences x {a.layers} layers, 4 heads of 16 (2 KV), fp32, one thread; "
          f"ms per step, median of {a.rounds} rounds")  # fmt: skip
    names = list(trees)
    print(f"  {'context':>7} {'layout':10s}" + "".join(f" {n:>9}" for n in names)
          + ("   this vs baseline" if len(names) > 1 else ""))  # fmt: skip
    for ctx_len in a.contexts:
        for layout in LAYOUTS:
            key = f"{ctx_len}/{layout}"
            ms = {n: statistics.median(r[key] for r in runs[n]) for n in names}
            line = f"  {ctx_len:>7} {layout:10s}" + "".join(f" {ms[n]:9.3f}" for n in names)
            if len(names) > 1:
                line += f"   {ms['baseline'] / ms['this']:.2f}x"
            print(line)
    ms = {n: statistics.median(r["prefill"] for r in runs[n]) for n in names}
    line = f"  prefill of one sequence, {a.prefill} tokens, shuffled blocks:" + "".join(
        f" {ms[n]:.2f}" for n in names
    )
    print(line + (f"   {ms['baseline'] / ms['this']:.2f}x" if len(names) > 1 else ""))


if __name__ == "__main__":
    main()
