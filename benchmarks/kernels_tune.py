"""Sweep the Triton attention launch parameters on CUDA (prints one line per config).

    python benchmarks/kernels_tune.py

Prefill: tile rows x key tile x warps x stages; decode: splits x key tile x warps.
The defaults in kernels/triton_attention.py come from this sweep.
"""

from __future__ import annotations

import itertools

import torch
import triton.testing
from kernels_attention import uniform_paged  # this script's folder is on sys.path

from kernels import triton_attention


def ms(fn) -> float:
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    except Exception as exc:  # a config that does not fit (shared memory) is skipped
        print(f"  failed: {type(exc).__name__}: {str(exc)[:120]}")
        return float("nan")


def main() -> None:
    heads, kv_heads, dim, block, dtype = 32, 8, 128, 16, torch.float16
    for batch, seq in [(1, 4096), (16, 512)]:
        k_cache, v_cache, tables, lens = uniform_paged(
            batch, seq, heads, kv_heads, dim, block, dtype, "cuda"
        )
        q = torch.randn(batch * seq, heads, dim, dtype=dtype, device="cuda")
        cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device="cuda")
        args = (q, k_cache, v_cache, tables, cu, lens, dim**-0.5)
        flops = 2 * batch * heads * dim * seq * seq
        for rows, bn, warps, stages in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3]):
            kw = dict(block_rows=rows, block_n=bn, num_warps=warps, num_stages=stages)
            t = ms(lambda a=args, kw=kw: triton_attention.paged_attention_prefill(*a, **kw))
            print(f"prefill B={batch} T={seq} {kw}: {t:.3f} ms {flops / t / 1e9:.1f} TFLOP/s")
    for batch, ctx in [(1, 32768), (8, 16384), (64, 4096)]:
        k_cache, v_cache, tables, lens = uniform_paged(
            batch, ctx, heads, kv_heads, dim, block, dtype, "cuda"
        )
        q = torch.randn(batch, heads, dim, dtype=dtype, device="cuda")
        args = (q, k_cache, v_cache, tables, lens, dim**-0.5)
        nbytes = 2 * batch * ctx * kv_heads * dim * 2
        for splits, bn, warps, stages in itertools.product(
            [None, 128, 256], [64, 128], [4, 8], [2, 3]
        ):
            kw = dict(num_splits=splits, block_n=bn, num_warps=warps, num_stages=stages)
            t = ms(lambda a=args, kw=kw: triton_attention.paged_attention_decode(*a, **kw))
            print(f"decode B={batch} ctx={ctx} {kw}: {t * 1e3:.1f} us {nbytes / t / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
