"""Paged-attention kernels: correctness and speed (prints figures; not a test).

    python benchmarks/kernels_attention.py [--device cpu|cuda] [--hbm-gbs 3350] [--json out.json]

On CPU it times the torch reference (the engine's CPU path) with one thread: decode K/V read
bandwidth, and prefill against torch SDPA on the same data. On CUDA it checks the Triton
kernels against the reference, measures decode bandwidth as a fraction of the GPU's HBM peak
at long contexts (bytes of K/V read / time / peak), and prefill TFLOP/s against torch SDPA
(flash, dense contiguous K/V: the same attention without paging).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import reference
from kernels.testing import make_paged_case

# Peak HBM bandwidth in GB/s by GPU name (vendor datasheets, SXM parts).
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10G": 600.0}


def bench(fn: Callable[[], object], device: str, reps: int = 20) -> float:
    """Median seconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def uniform_paged(
    batch: int, ctx: int, heads: int, kv_heads: int, dim: int, block_size: int, dtype, device
):
    """A random paged cache where every sequence has `ctx` tokens, blocks shuffled."""
    blocks = -(-ctx // block_size)
    num_blocks = batch * blocks + 1
    shape = (num_blocks, block_size, kv_heads, dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    perm = torch.randperm(num_blocks, device=device)[: batch * blocks]
    tables = perm.view(batch, blocks).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, lens


def check_correctness(device: str) -> list[dict]:
    """Triton vs reference on mixed shapes (CUDA only)."""
    from kernels import triton_attention

    rows = []
    cases = [  # (block, H, Hkv, D, dtype, window, ctx, q_lens)
        (16, 32, 8, 128, torch.float16, None, [1, 16, 17, 1000, 4097], None),
        (16, 32, 8, 128, torch.bfloat16, 1024, [5, 3000, 2048], None),
        (8, 9, 3, 64, torch.float32, None, [1, 8, 9, 700], None),
        (16, 32, 8, 128, torch.float16, None, [300, 1200, 17, 64], [300, 100, 1, 64]),
        (32, 28, 4, 128, torch.bfloat16, 256, [700, 513], [700, 13]),
        (8, 9, 3, 64, torch.float32, None, [33, 9], [33, 4]),
    ]
    for block, heads, kv_heads, dim, dtype, window, ctx, q_lens in cases:
        phase = "decode" if q_lens is None else "prefill"
        case = make_paged_case(
            ctx, q_lens or [1] * len(ctx), heads, kv_heads, dim, block, dtype, device, seed=1
        )
        base = (case.q, case.k_cache, case.v_cache, case.block_tables)
        if phase == "decode":
            args = (*base, case.context_lens, case.scale, window)
            out = triton_attention.paged_attention_decode(*args)
            ref = reference.paged_attention_decode(*args)
        else:
            args = (*base, case.cu_seqlens_q, case.context_lens, case.scale, window)
            out = triton_attention.paged_attention_prefill(*args)
            ref = reference.paged_attention_prefill(*args)
        err = (out.float() - ref.float()).abs().max().item()
        tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        row = dict(phase=phase, dtype=str(dtype), heads=heads, kv_heads=kv_heads, dim=dim)
        row.update(block=block, window=window, ctx=ctx, max_abs_err=err, ok=err <= tol)
        rows.append(row)
        print(f"correct {phase:7s} {row['dtype']:14s} H={heads}/{kv_heads} D={dim} bs={block} "
              f"win={window} ctx={ctx}: max|err|={err:.2e} {'OK' if row['ok'] else 'FAIL'}")  # fmt: skip
    return rows


def decode_figures(device: str, peak_gbs: float | None, quick: bool) -> list[dict]:
    heads, kv_heads, dim, block = (32, 8, 128, 16) if device == "cuda" else (9, 3, 64, 16)
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cuda":
        shapes = [(1, 32768), (8, 16384), (16, 32768), (32, 8192), (64, 4096), (128, 2048)]
    else:
        shapes = [(1, 2048), (8, 512)] if quick else [(1, 4096), (8, 1024), (32, 256)]
    rows = []
    for batch, ctx in shapes:
        k_cache, v_cache, tables, lens = uniform_paged(
            batch, ctx, heads, kv_heads, dim, block, dtype, device
        )
        q = torch.randn(batch, heads, dim, dtype=dtype, device=device)
        args = (q, k_cache, v_cache, tables, lens, dim**-0.5)
        kv_bytes = 2 * batch * ctx * kv_heads * dim * k_cache.element_size()
        row = dict(batch=batch, ctx=ctx, heads=heads, kv_heads=kv_heads, dim=dim, dtype=str(dtype))
        t_ref = bench(lambda a=args: reference.paged_attention_decode(*a), device, reps=5)
        row.update(ref_ms=t_ref * 1e3, ref_gbs=kv_bytes / t_ref / 1e9)
        line = f"decode B={batch:4d} ctx={ctx:6d}: torch ref {t_ref * 1e3:8.3f} ms "
        line += f"({row['ref_gbs']:8.3f} GB/s)"
        if device == "cuda":
            from kernels import triton_attention

            t = bench(lambda a=args: triton_attention.paged_attention_decode(*a), device)
            gbs = kv_bytes / t / 1e9
            row.update(triton_ms=t * 1e3, triton_gbs=gbs, speedup_vs_ref=t_ref / t)
            line += f" | triton {t * 1e3:7.3f} ms {gbs:7.1f} GB/s"
            if peak_gbs:
                row["hbm_fraction"] = gbs / peak_gbs
                line += f" = {100 * gbs / peak_gbs:5.1f}% of {peak_gbs:.0f} GB/s"
        print(line)
        rows.append(row)
        del k_cache, v_cache
    return rows


def prefill_figures(device: str, quick: bool) -> list[dict]:
    """Full causal prefill (no cached prefix) vs SDPA on the same K/V laid out densely."""
    heads, kv_heads, dim, block = (32, 8, 128, 16) if device == "cuda" else (9, 3, 64, 16)
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cuda":
        shapes = [(1, 4096), (4, 2048), (16, 512), (1, 16384)]
    else:
        shapes = [(1, 256)] if quick else [(1, 512), (4, 256)]
    group = heads // kv_heads
    rows = []
    for batch, seq in shapes:
        k_cache, v_cache, tables, lens = uniform_paged(
            batch, seq, heads, kv_heads, dim, block, dtype, device
        )
        q = torch.randn(batch * seq, heads, dim, dtype=dtype, device=device)
        cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device)
        args = (q, k_cache, v_cache, tables, cu, lens, dim**-0.5)
        # the same keys/values, dense and expanded to all heads (SDPA's fastest layout)
        pos = torch.arange(seq, device=device)
        slots = (tables[:, pos // block].long() * block + pos % block).view(-1)
        k = k_cache.flatten(0, 1)[slots].view(batch, seq, kv_heads, dim)
        v = v_cache.flatten(0, 1)[slots].view(batch, seq, kv_heads, dim)
        k = k.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
        v = v.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
        qd = q.view(batch, seq, heads, dim).transpose(1, 2).contiguous()

        def sdpa(qd=qd, k=k, v=v):
            return F.scaled_dot_product_attention(qd, k, v, is_causal=True)

        flops = 2 * batch * heads * dim * seq * seq  # causal: half of 4 * B * H * D * T^2
        t_sdpa = bench(sdpa, device, reps=3)
        row = dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, dim=dim, dtype=str(dtype))
        row.update(sdpa_ms=t_sdpa * 1e3, sdpa_tflops=flops / t_sdpa / 1e12)
        if device == "cuda":
            from kernels import triton_attention

            t = bench(lambda a=args: triton_attention.paged_attention_prefill(*a), device)
            name = "triton"
        else:
            t = bench(lambda a=args: reference.paged_attention_prefill(*a), device, reps=3)
            name = "torch ref"
        row.update(kernel=name, kernel_ms=t * 1e3, kernel_tflops=flops / t / 1e12)
        row["kernel_vs_sdpa"] = t_sdpa / t
        print(
            f"prefill B={batch:3d} T={seq:6d}: {name} {t * 1e3:8.3f} ms "
            f"{flops / t / 1e12:8.4f} TFLOP/s | SDPA {t_sdpa * 1e3:8.3f} ms "
            f"{flops / t_sdpa / 1e12:8.4f} TFLOP/s | {name}/SDPA speed {t_sdpa / t:5.2f}x"
        )
        rows.append(row)
        del k_cache, v_cache, k, v
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--hbm-gbs", type=float, default=None, help="peak HBM GB/s of the GPU")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    result: dict = {"device": device, "torch": torch.__version__}
    peak = args.hbm_gbs
    if device == "cuda":
        import triton

        name = torch.cuda.get_device_name()
        result.update(gpu=name, triton=triton.__version__)
        peak = peak or next((v for k, v in HBM_GBS.items() if k in name), None)
        print(f"GPU {name}; torch {torch.__version__}; triton {triton.__version__}; "
              f"peak HBM {peak} GB/s")  # fmt: skip
        if not args.skip_correctness:
            result["correctness"] = check_correctness(device)
    else:
        torch.set_num_threads(1)
        print(f"CPU, torch {torch.__version__}, 1 thread: the torch reference path")
    result["hbm_peak_gbs"] = peak
    result["decode"] = decode_figures(device, peak, args.quick)
    result["prefill"] = prefill_figures(device, args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if not all(r["ok"] for r in result.get("correctness", [])):
        sys.exit(1)


if __name__ == "__main__":
    main()
